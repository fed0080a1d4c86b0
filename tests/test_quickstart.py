"""The getting-started script runs, and its profiler table agrees with a hand count of spikes."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_rates_equal_a_hand_count_of_the_same_network():
    snn = pytest.importorskip("snntorch")
    from snntorch import utils
    proc = subprocess.run([sys.executable, os.path.join("examples", "quickstart.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = {m.group(1): float(m.group(2))
               for m in re.finditer(r"^(\d+)\s+\d+\s+([0-9.]+)\s", proc.stdout, re.MULTILINE)}
    assert set(printed) == {"2", "4"}, proc.stdout
    assert re.search(r"finite-size exponent [+-]\d\.\d{4} per step", proc.stdout)
    # the same network and batch, run plainly; spikes counted by forward hooks of our own
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(256, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    x = torch.rand(64, 1, 28, 28)
    counts = {"2": [], "4": []}
    for name in counts:
        net[int(name)].register_forward_hook(
            lambda m, i, out, name=name: counts[name].append(out[0] if isinstance(out, tuple) else out))
    utils.reset(net)
    with torch.no_grad():
        for _ in range(25):
            net(x)
    for name, spikes in counts.items():
        assert printed[name] == pytest.approx(torch.stack(spikes).mean().item(), abs=6e-5)
