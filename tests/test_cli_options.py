"""Every expected failure of the command line is exit code 2 and one line naming the option or
the file; Ctrl-C is one line saying how to resume. A traceback would mean a bug."""
import json
import os
import subprocess
import sys

import pytest
import torch

from stablespike.cli import main

SWEEP = ["bench", "depth-scaling", "--depths", "1", "--epochs", "1", "--width", "8", "--T", "2",
         "--batch_size", "512", "--no-progress"]


def _fails(argv, capsys):
    """(exit code, the stderr lines) of ``main(argv)``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


BAD_OPTIONS = [
    (["--lambda_target", "nan"], "--lambda_target"),
    (["--lambda_target", "inf"], "--lambda_target"),
    (["--lyap_eps", "0"], "--lyap_eps"),
    (["--lyap_fraction", "0"], "--lyap_fraction"),
    (["--lyap_fraction", "1.5"], "--lyap_fraction"),
    (["--lambda_reg", "-1"], "--lambda_reg"),
    (["--grad_clip", "-1"], "--grad_clip"),
    (["--lr", "0"], "--lr"),
    (["--warmup_epochs", "-1"], "--warmup_epochs"),
    (["--target_rate", "0"], "--target_rate"),
    (["--seeds", "-1"], "--seeds"),
    (["--seed", "-1"], "--seed"),
    (["--depths", "two"], "--depths"),
    (["--device", "bogus"], "--device"),
    (["--device", "cuda"], "--device"),
    (["--width", "2000000", "--depths", "2"], "--width"),  # 4e12 weights: 64 TB with AdamW's state
]


@pytest.mark.parametrize("extra, option", BAD_OPTIONS)
def test_a_bad_option_is_exit_2_and_one_line_naming_it(extra, option, tmp_path, capsys):
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = _fails(SWEEP + extra + ["--out_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"argument {option}:" in err[0] and extra[1] in err[0] and "Traceback" not in err[0]
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_an_out_dir_under_a_regular_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = _fails(SWEEP + ["--out_dir", str(tmp_path / "file" / "sweep")], capsys)
    assert code == 2 and len(err) == 1 and "argument --out_dir:" in err[0], err


def test_resuming_with_other_options_names_the_option_and_both_values(tmp_path, capsys):
    from stablespike.bench import SweepConfig
    from stablespike.runfiles import write_json
    from stablespike.train import TrainConfig
    write_json(SweepConfig(depths=[1], width=8, train=TrainConfig(epochs=1, batch_size=512, T=2)).to_dict(),
               str(tmp_path / "config.json"))
    argv = [a if a != "8" else "16" for a in SWEEP] + ["--out_dir", str(tmp_path), "--resume"]
    code, err = _fails(argv, capsys)
    assert code == 2 and len(err) == 1 and "argument --width:" in err[0] and "8, now 16" in err[0], err


def test_a_busy_sweep_directory_is_refused(tmp_path, capsys):
    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    code, err = _fails(SWEEP + ["--out_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "--out_dir" in err[0] and f"process {os.getppid()}" in err[0], err


def test_a_corrupt_checkpoint_is_named(tmp_path, capsys):
    run = tmp_path / "runs" / "vanilla_d1_s0"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    code, err = _fails(SWEEP + ["--out_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and str(run / "checkpoint.pt") in err[0], err


def test_report_names_a_hand_edited_results_file(tmp_path, capsys):
    assert main(SWEEP + ["--depths", "1", "--out_dir", str(tmp_path), "--resume"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results_seeds.json").read_text())
    results["vanilla"]["1"]["0"]["history"][0]["test_acc"] = 0.99
    (tmp_path / "results_seeds.json").write_text(json.dumps(results))
    code, err = _fails(["report", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "results_seeds.json" in err[0], err
    code, err = _fails(["report", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and len(err) == 1 and "nowhere" in err[0], err


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    import stablespike.bench as bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_sweep", interrupted)
    assert main(SWEEP + ["--out_dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and str(tmp_path) in err[0], err


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real program: one line on stderr, exit code 2 (the parametrized cases run in-process)."""
    done = subprocess.run([sys.executable, "-m", "stablespike", *SWEEP, "--lambda_target", "nan",
                           "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--lambda_target" in done.stderr and "Traceback" not in done.stderr
