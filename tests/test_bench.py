"""The depth-scaling sweep: resume after a kill, divergence recorded, report, CLI errors."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import stablespike.bench.depth_scaling as ds
from stablespike.bench import SweepConfig, run_sweep
from stablespike.bench.report import write_report
from stablespike.cli import main
from stablespike.data import load_dataset
from stablespike.train import TrainConfig


def small(**kw):
    return SweepConfig(dataset="digits", depths=[1, 2], seeds=[0], width=32,
                       train=TrainConfig(epochs=1, batch_size=128, T=4, progress=False), **kw)


def test_a_killed_sweep_resumes_without_recomputing_or_corrupting(tmp_path, monkeypatch):
    calls = []
    real_fit = ds.fit

    def fit_then_die(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second run
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(ds, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(small(), str(tmp_path))
    first = (tmp_path / "runs" / "vanilla_d1_s0.json").read_text()
    results = json.loads((tmp_path / "results.json").read_text())  # valid JSON after the kill
    assert list(results["vanilla"]) == ["1"] and results["lyapunov"] == {}
    # the report renders what has finished: one run, three missing
    assert "1 of 4 runs finished: a partial sweep" in write_report(str(tmp_path))
    assert "<table" in (tmp_path / "report.html").read_text()
    calls.clear()
    monkeypatch.setattr(ds, "fit", lambda *a, **k: (calls.append(1), real_fit(*a, **k))[1])
    by_seed = run_sweep(small(), str(tmp_path), resume=True)
    assert len(calls) == 3  # 4 runs in all, the finished one not recomputed
    assert (tmp_path / "runs" / "vanilla_d1_s0.json").read_text() == first
    assert sorted(by_seed["lyapunov"]) == ["1", "2"]
    seed_format = json.loads((tmp_path / "results.json").read_text())
    assert set(seed_format["vanilla"]["2"][0]) >= {"epoch", "train_loss", "test_acc", "lyapunov", "grad_norm"}


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real_build = ds.build_model

    def build(cfg, depth, data, init=None, **kw):
        model = real_build(cfg, depth, data, init, **kw)
        if depth == 1:
            with torch.no_grad():
                model.readout.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(ds, "build_model", build)
    by_seed = run_sweep(small(), str(tmp_path))
    assert by_seed["vanilla"]["1"]["0"]["status"] == "DIVERGED"
    assert by_seed["vanilla"]["2"]["0"]["status"] == "OK"
    text = write_report(str(tmp_path))
    assert "FAILED" in text and "diverged" in text
    for name in ("report.md", "report.html", "accuracy_vs_depth.png", "layer_rates.png"):
        assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "depth-scaling", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["bench", "depth-scaling", "--reg_type", "l3"], "invalid choice: 'l3'"),
    (["bench", "depth-scaling", "--depths", "0", "2"], "expected an integer >= 1"),
    (["bench", "depth-scaling", "--surrogate_slope", "0", "--depths", "1"], "--surrogate_slope: expected a finite number > 0"),
])
def test_cli_rejects_bad_arguments_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_cli_runs_a_tiny_sweep_and_rerenders_its_report(tmp_path, capsys):
    assert main(["bench", "depth-scaling", "--depths", "1", "--epochs", "1", "--width", "16", "--T", "3",
                 "--batch_size", "256", "--no-progress", "--out_dir", str(tmp_path), "--resume"]) == 0
    assert "results, plots and report in" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 0
    assert "Depth scaling on digits" in capsys.readouterr().out


def test_the_vgg_family_runs_in_the_sweep(tmp_path):
    cfg = SweepConfig(dataset="digits", model="vgg", depths=[1], seeds=[0],
                      train=TrainConfig(epochs=1, batch_size=256, T=2, progress=False))
    by_seed = run_sweep(cfg, str(tmp_path))
    run = by_seed["lyapunov"]["1"]["0"]
    assert run["status"] == "OK" and run["history"][0]["lyapunov"] is not None
    assert list(run["layer_rates"]) == ["stages.0.0.lif"]


def test_inits_side_by_side_with_the_profilers_verdict(tmp_path):
    cfg = SweepConfig(dataset="digits", depths=[1, 8], seeds=[0], width=32, inits=["default", "calibrated"],
                      train=TrainConfig(epochs=1, batch_size=256, T=4, progress=False))
    by_seed = run_sweep(cfg, str(tmp_path))
    assert list(by_seed) == ["vanilla", "lyapunov", "calibrated", "calibrated+lyapunov"]
    deep_default = by_seed["vanilla"]["8"]["0"]
    assert any("silent_layer" in f for f in deep_default["verdict"]["findings"])
    text = write_report(str(tmp_path))
    assert "calibrated+lyapunov Acc" in text and "failing run vanilla depth 8" in text
    # the report says what to do for the silent deep run: the cure measured in this repository
    todo = [line for line in text.splitlines() if line.startswith("What to do for")]
    assert any("vanilla at depth" in line and "8 (seed 0)" in line and "--init calibrated --surrogate_slope 1" in line
               for line in todo)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>What to do</h2>" in page and "<table>" in page


def test_the_surrogate_slope_reaches_every_neuron():
    data = ds.load_dataset("digits")
    for model in ("mlp", "vgg"):
        cfg = SweepConfig(dataset="digits", model=model, depths=[2], surrogate_slope=1.5)
        net = ds.build_model(cfg, 2, data)
        slopes = {m.spike_grad.slope for m in net.modules() if hasattr(m, "spike_grad")}
        assert slopes == {1.5}


def test_a_sweep_without_the_default_init_reports_its_own_pair(tmp_path):
    """--inits calibrated alone: the seed's two columns become calibrated / calibrated+lyapunov."""
    cfg = SweepConfig(dataset="digits", depths=[1, 2], seeds=[0], width=16, inits=["calibrated"],
                      train=TrainConfig(epochs=1, batch_size=128, T=3, progress=False))
    run_sweep(cfg, str(tmp_path))
    text = write_report(str(tmp_path))
    assert "calibrated Acc" in text and "calibrated+lyapunov Acc" in text and "init calibrated" in text
    assert "Vanilla" not in text


def test_the_report_judges_conditioning_by_the_effective_condition_number(tmp_path):
    # weight gradients are rank-deficient: the seed's largest / (smallest + 1e-12) is huge on any
    # net, and the report used to call every run ill-conditioned from it
    by_seed = run_sweep(replace(small(), depths=[2]), str(tmp_path))
    last = by_seed["vanilla"]["2"]["0"]["history"][-1]
    assert last["grad_condition"] > 1e6
    assert 1 <= last["grad_condition_eff"] < 1e6
    assert "ill-conditioned" not in write_report(str(tmp_path))


def test_a_sweep_stopped_before_its_first_run_finished_has_a_report(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ds, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(small(), str(tmp_path))
    assert "0 of 4 runs finished" in write_report(str(tmp_path))


def test_subsets_are_stratified_and_seeded():
    from stablespike.data import load_dataset, stratified_subset
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    picked = stratified_subset(y, 10, seed=4)
    assert sorted(np.bincount(y[picked])) == [2, 3, 5] and len(set(picked)) == 10  # 50:30:20
    assert np.array_equal(picked, stratified_subset(y, 10, seed=4))
    assert not np.array_equal(np.sort(picked), np.sort(stratified_subset(y, 10, seed=5)))
    digits = load_dataset("digits")
    sub = digits.subset(train=101, test=40, seed=0)
    assert len(sub.x_train) == 101 and len(sub.y_test) == 40
    counts = np.bincount(sub.y_train.numpy(), minlength=10)
    full = np.bincount(digits.y_train.numpy(), minlength=10) * 101 / len(digits.y_train)
    assert np.all(np.abs(counts - full) < 1)  # each class within rounding of its share
    with pytest.raises(ValueError, match="train_subset"):
        digits.subset(train=0)


def test_width_sets_the_vgg_channels_and_help_shows_every_default(capsys):
    from stablespike.cli import build_parser
    cfg = SweepConfig(dataset="digits", model="vgg", depths=[2], width=8)
    model = ds.build_model(cfg, 2, load_dataset("digits"))
    assert model.stages[0][0].conv.out_channels == 8 and model.stages[1][0].conv.out_channels == 16
    assert SweepConfig(model="vgg").width == 64 and SweepConfig().width == 128
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "depth-scaling", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 2 4;", "(default: 10;", "(default: 128;", "(default: 8;", "(default: 0.001)",
                  "(default: squared)", "(default: 0.01)", "(default: runs/depth_scaling)",
                  "(default: 128 for the MLP, 64 for the VGG", "(default: all)"):
        assert shown in text, shown


def test_the_penalty_verdict_weighs_each_depth_against_the_seed_spread():
    from stablespike.bench.report import observations
    rows = [{"depth": 2, "vanilla_acc": 0.82, "vanilla_acc_sd": 0.004, "lyapunov_acc": 0.80, "lyapunov_acc_sd": 0.005,
             "vanilla_failed": 0, "lyapunov_failed": 0},
            {"depth": 8, "vanilla_acc": 0.50, "vanilla_acc_sd": 0.05, "lyapunov_acc": 0.55, "lyapunov_acc_sd": 0.05,
             "vanilla_failed": 0, "lyapunov_failed": 0},
            {"depth": 32, "vanilla_acc": 0.10, "vanilla_acc_sd": 0.0, "lyapunov_acc": 0.30, "lyapunov_acc_sd": 0.0,
             "vanilla_failed": 0, "lyapunov_failed": 0}]
    verdict = observations(rows, ["vanilla", "lyapunov"])[-1]
    # 0.02 lower beyond 2 x 0.0064; 0.05 higher within 2 x 0.071; 0.2 higher with no spread
    assert verdict == ("lyapunov against vanilla: helps at depth 32 (+0.200); hurts at depth 2 (-0.020); "
                       "no difference beyond the seed spread at depth 8 (+0.050)")
