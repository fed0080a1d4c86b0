"""The first-use cost: ``import stablespike`` and a FiringRateMonitor on an snnTorch MLP, beyond
``import torch, snntorch``. Each measurement is a fresh Python process (nothing cached in
``sys.modules``); the two kinds alternate, after one warm-up of each (the OS file cache); medians.

    python benchmarks/import_time.py [--reps 5]

Target: at most 0.5 s beyond ``import torch, snntorch``.
"""
import argparse
import statistics
import subprocess
import sys

BASE = "import time; t = time.perf_counter(); import torch, snntorch; "
PLAIN = BASE + "print(time.perf_counter() - t)"
WITH_MONITOR = BASE + """import torch.nn as nn, snntorch as snn, stablespike
net = nn.Sequential(nn.Linear(784, 100), snn.Leaky(beta=0.9, init_hidden=True),
                    nn.Linear(100, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
monitor = stablespike.FiringRateMonitor(net)
print(time.perf_counter() - t)"""


def seconds(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    seconds(PLAIN), seconds(WITH_MONITOR)  # warm-up
    plain, full = [], []
    for _ in range(args.reps):
        plain.append(seconds(PLAIN))
        full.append(seconds(WITH_MONITOR))
    a, b = statistics.median(plain), statistics.median(full)
    print(f"import torch, snntorch: {a:.3f} s; + import stablespike + FiringRateMonitor: {b:.3f} s; "
          f"difference {b - a:.3f} s (target <= 0.5 s; medians of {args.reps} fresh processes)")


if __name__ == "__main__":
    main()
