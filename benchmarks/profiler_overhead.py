"""Cost of ``SpikeProfiler.attach`` on a training step, measured side by side.

Network: the 784-512-512-512-10 LIF MLP of the monitor benchmark (snnTorch neurons), T=25, B=64.
A training step is forward, cross-entropy, backward, AdamW. The profiler records spikes and
membranes of every neuron on forward and the surrogate gradient on backward, through hooks.
Each variant runs on its own copy of the model (same weights), interleaved in rotating order
after a warm-up; medians.

    python benchmarks/profiler_overhead.py [--reps 21]
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from stablespike import SpikeProfiler, SpikingMLP
from _timing import time_paired

T, B = 25, 64


def build():
    torch.manual_seed(0)
    return SpikingMLP(784, [512, 512, 512], 10)


def make_step(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, _, _ = model(x)
        F.cross_entropy(logits, y).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=61)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    x, y = torch.rand(B, T, 784), torch.randint(0, 10, (B,))
    plain, profiled = build(), build()
    profiler = SpikeProfiler().attach(profiled)
    steps = {"no profiler": make_step(plain, x, y), "SpikeProfiler.attach": make_step(profiled, x, y)}
    med, ratio = time_paired(steps, "no profiler", args.warmup, args.reps)
    print(f"training step of a 784-512-512-512-10 LIF MLP, T={T}, B={B}; median of {args.reps} "
          f"interleaved reps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in med.items():
        print(f"  {name:<22} {1e3 * t:8.1f} ms   {ratio[name]:5.3f}x (median of paired ratios; "
              f"ratio of medians {t / med['no profiler']:.3f}x)")
    report = profiler.report()
    print(f"  (the profiler saw {len(report.layer_stats)} layers over "
          f"{report.layer_stats['lifs.0'].steps} steps x samples; health {report.health_score:.0f}/100)")
    profiler.detach()


if __name__ == "__main__":
    main()
