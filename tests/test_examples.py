import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_snntorch_penalty_example_runs_fast():
    proc = subprocess.run([sys.executable, os.path.join("examples", "snntorch_penalty.py"), "--fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = re.search(r"^summary: .*lambda=(\S+) test_acc=(\S+)", proc.stdout, re.MULTILINE)
    assert summary, proc.stdout
    lam, acc = float(summary.group(1)), float(summary.group(2))
    assert math.isfinite(lam)
    assert 0.0 <= acc <= 1.0
    epoch_row = re.search(r"^\s+1\s+(\S+)\s+(\S+)\s+(\S+)\s*$", proc.stdout, re.MULTILINE)
    assert epoch_row, proc.stdout
    assert float(epoch_row.group(2)) == lam and float(epoch_row.group(3)) == acc


def run_example(name: str, argv, capsys) -> str:
    """Run ``examples/<name>.py``'s ``main(argv)`` in this process; returns what it printed."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    return capsys.readouterr().out


def test_diagnose_snntorch_example_rates_equal_a_count_of_the_forwards_own_spikes(tmp_path, capsys):
    out = run_example("diagnose_snntorch", ["--fast", "--html", str(tmp_path / "p.html")], capsys)
    checks = re.findall(r"^check (\S+)\s+profiler ([0-9.]+)\s+hand count ([0-9.]+)$", out, re.MULTILINE)
    assert [name for name, _, _ in checks] == [f"lifs.{i}" for i in range(6)] + ["lif_out"]
    for _, profiled, counted in checks:
        assert float(profiled) == float(counted)
    assert float(checks[0][1]) > 0 and float(checks[-1][1]) == 0  # the first layer fires, the deep ones not
    assert "silent_layer @ lifs.5" in out and (tmp_path / "p.html").stat().st_size > 1000


def test_diagnose_spikingjelly_example_records_equal_spikingjellys_own_monitor(capsys):
    import pytest
    pytest.importorskip("spikingjelly.activation_based")
    out = run_example("diagnose_spikingjelly", ["--fast"], capsys)
    assert "monitored layers ['2', '6', '10']; 3 records, equal to spikingjelly's OutputMonitor: True" in out
    assert re.search(r"^2\s+1024\s+0\.\d+", out, re.MULTILINE)  # the profiler's table: conv layer 2


def test_wake_silent_network_example_finds_silent_layers_and_calibrates_every_one(capsys):
    out = run_example("wake_silent_network", ["--fast"], capsys)
    silent = re.search(r"silent layers: (.*)$", out, re.MULTILINE).group(1).split(", ")
    assert "17" in silent and len(silent) >= 3  # the output layer and the deep ones never fire at init
    rows = re.findall(r"^(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+\S+\s+\d+\s+(yes|no)", out, re.MULTILINE)
    assert len(rows) == 9 and all(ok == "yes" and abs(float(after) - 0.1) <= 0.02 for _, _, after, ok in rows)
    assert re.search(r"as it is 0\.\d{3}, calibrated \+ slope 1 0\.\d{3}", out)


def test_depth_scaling_example_writes_every_run_and_the_report(tmp_path, capsys):
    out = run_example("depth_scaling_sweep", ["--fast", "--out_dir", str(tmp_path)], capsys)
    assert len([f for f in os.listdir(tmp_path / "runs") if f.endswith(".json")]) == 8  # 4 variants x 2 depths
    assert (tmp_path / "report.html").exists() and "calibrated+lyapunov" in out
    again = run_example("depth_scaling_sweep", ["--fast", "--out_dir", str(tmp_path)], capsys)
    assert again.splitlines()[:3] == out.splitlines()[:3]  # resumed: every run was already there


def test_torchrun_example_trains_a_users_model_with_the_penalty_on_one_process(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = run_example("torchrun_training", ["--fast", "--out_dir", str(tmp_path)], capsys)
    assert "OK: 1 epoch(s), world size 1" in out
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1
    assert re.search(r'"lyapunov": -?\d', out)


def test_lightning_example_logs_rates_and_histograms_and_writes_the_report(tmp_path, capsys):
    import pytest
    pytest.importorskip("lightning.pytorch")
    out = run_example("lightning_diagnostics", ["--fast", "--root", str(tmp_path)], capsys)
    reports = re.findall(r"^report: (\S+)$", out, re.MULTILINE)
    assert sorted(os.path.basename(p) for p in reports) == ["diagnostics_epoch0.html", "diagnostics_epoch0.json"]
    assert all(os.path.getsize(p) > 100 and str(tmp_path) in p for p in reports)
    verdict = re.search(r"^verdict of the last epoch: health (\d+)/100, (\d+) finding", out, re.MULTILINE)
    import json
    with open(next(p for p in reports if p.endswith(".json"))) as f:
        report = json.load(f)  # the printed verdict is the report file's
    assert (int(verdict.group(1)), int(verdict.group(2))) == (round(report["health_score"]), len(report["pathologies"]))
    if "TensorBoardLogger" in out:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(re.search(r"^logs \(\w+\): (\S+)$", out, re.MULTILINE).group(1),
                                  size_guidance={"histograms": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("firing_rate/2")] == [0, 2]
        assert [e.step for e in events.Histograms("rate_histogram/2")] == [0, 2]
        assert events.Histograms("rate_histogram/2")[0].histogram_value.num == 64  # the layer's neurons
