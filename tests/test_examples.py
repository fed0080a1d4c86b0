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
