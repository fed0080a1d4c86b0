"""examples/lightning_diagnostics.py as a user runs it (a fresh process, ``--fast``): it exits 0,
the log directory and report files it names exist, and the verdict it prints is the one its
last report file holds."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lightning_example_runs_and_the_files_it_names_exist(tmp_path):
    pytest.importorskip("lightning.pytorch")
    proc = subprocess.run([sys.executable, os.path.join("examples", "lightning_diagnostics.py"), "--fast",
                           "--root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log_dir = re.search(r"^logs \((TensorBoardLogger|CSVLogger)\): (\S+)$", proc.stdout, re.MULTILINE)
    assert log_dir and os.path.isdir(log_dir.group(2)), proc.stdout
    assert os.path.commonpath([log_dir.group(2), str(tmp_path)]) == str(tmp_path)  # under --root
    logged = os.listdir(log_dir.group(2))
    if log_dir.group(1) == "TensorBoardLogger":
        assert any(name.startswith("events.out.tfevents") for name in logged), logged
    else:
        assert "metrics.csv" in logged, logged
    reports = re.findall(r"^report: (\S+)$", proc.stdout, re.MULTILINE)
    # --fast: 4 steps, one epoch, one JSON and one HTML report, in the log directory
    assert sorted(os.path.basename(p) for p in reports) == ["diagnostics_epoch0.html", "diagnostics_epoch0.json"]
    assert all(os.path.dirname(p) == log_dir.group(2) and os.path.getsize(p) > 100 for p in reports)
    verdict = re.search(r"^verdict of the last epoch: health (\d+)/100, (\d+) finding", proc.stdout, re.MULTILINE)
    assert verdict, proc.stdout
    with open(next(p for p in reports if p.endswith(".json"))) as f:
        report = json.load(f)
    assert int(verdict.group(1)) == round(report["health_score"])
    assert int(verdict.group(2)) == len(report["pathologies"])
    assert "epoch 0: health" in proc.stderr  # the callback's own verdict, through logging
