"""Cost of the tangent spectrum, and how the estimate converges with the number of steps.

1. Cost: ``tangent_spectrum`` with k = 1, 4, 16 on a 784-256x4-10 LIF MLP (T=25, B=16), against one
   plain forward pass of the same batch (no grad), interleaved in rotating order, medians.
2. Convergence: the largest exponent of a chaotic tanh RNN (N=100, g=2) estimated over T steps
   (first 100 discarded), mean and spread over 8 samples.

    python benchmarks/lyapunov_spectrum.py [--reps 7]
"""
from __future__ import annotations

import argparse
import math
import sys
import os

import torch

from stablespike import SpikingMLP, tangent_spectrum
from _timing import time_interleaved

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from steppers import TanhRNN  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = SpikingMLP(784, [256] * 4, 10, threshold=0.5)
    x = torch.rand(16, 25, 784)

    def forward():
        with torch.no_grad():
            model(x)

    variants = {"forward": forward}
    for k in (1, 4, 16):
        variants[f"k={k}"] = (lambda k=k: tangent_spectrum(model, x, batch_dim=0, k=k))
    med = time_interleaved(variants, warmup=1, reps=args.reps)
    print(f"tangent spectrum of a 784-256x4-10 LIF MLP, T=25, B=16 (median of {args.reps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"  {'':<10} {'time':>10} {'x forward':>10}")
    for name, t in med.items():
        print(f"  {name:<10} {1e3 * t:8.1f} ms {t / med['forward']:9.1f}x")

    print("\nconvergence of lambda_1, tanh RNN N=100, g=2 (100 steps discarded), 8 samples")
    rnn = TanhRNN(100, g=2.0, seed=0)
    print(f"  {'T':>6} {'mean':>8} {'spread':>8}")
    for T in (150, 300, 600, 1200, 2400):
        r = tangent_spectrum(rnn, torch.zeros(T, 8, 100, dtype=torch.float64), discard=100)
        ps = r.per_sample[:, 0]
        print(f"  {T:>6} {float(ps.mean()):+8.4f} {float(ps.std()):8.4f}")
    print(f"  (mean-field value for g=2, large N: about 0.15; ln 2 = {math.log(2):.3f} bounds it)")


if __name__ == "__main__":
    main()
