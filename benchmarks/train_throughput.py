"""Training throughput (samples/s) of the spiking MLP and the spiking VGG at two depths each.

A training step (forward, cross-entropy, backward, AdamW) on random data shaped as the models
expect; rotating interleaved order after a warm-up; medians.

    python benchmarks/train_throughput.py [--reps 7]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from stablespike import SpikingMLP, SpikingVGG
from _timing import time_interleaved


def step_fn(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[0], y).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    B = 128
    cases = {}
    for d in (2, 8):
        cases[f"MLP 784-256x{d}-10, T=8, B={B}"] = (SpikingMLP(784, [256] * d, 10),
                                                    torch.rand(B, 8, 784), B)
    Bv = 32
    for stages, blocks in ((2, 1), (4, 2)):
        model = SpikingVGG(1, 10, base_channels=16, num_stages=stages, blocks_per_stage=blocks, T=4, input_size=28)
        cases[f"VGG {stages}x{blocks} blocks, 16 ch, 28x28, T=4, B={Bv}"] = (model, torch.rand(Bv, 1, 28, 28), Bv)
    steps = {name: step_fn(m, x, torch.randint(0, 10, (b,))) for name, (m, x, b) in cases.items()}
    med = time_interleaved(steps, warmup=1, reps=args.reps)
    print(f"training throughput, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}")
    for name, t in med.items():
        print(f"  {name:<44} {1e3 * t:8.1f} ms/step {cases[name][2] / t:9.0f} samples/s")


if __name__ == "__main__":
    main()
