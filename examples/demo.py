"""A two-minute tour: the Lyapunov exponent of each seed model, then Lyapunov-regularized training.

    make demo            # or: python examples/demo.py [--steps 40] [--seed 0]

The data are synthetic (noisy copies of 10 random prototypes, presented for T steps), so the demo
needs no download. The depth-scaling benchmark on real data sets is its own command.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stablespike import (LyapunovRegularizer, RecurrentSpikingMLP, SpikingMLP, SpikingVGG,
                         finite_difference_lyapunov)


def prototypes_task(n: int, dim: int, classes: int, T: int, g: torch.Generator):
    """``(x (B, T, dim), y (B,))``: noisy copies of fixed class prototypes, repeated over T steps."""
    protos = torch.rand(classes, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, classes, (n,), generator=g)
    x = (protos[y] + 0.35 * torch.randn(n, dim, generator=g)).clamp(0, 1)
    return x.unsqueeze(1).expand(n, T, dim).contiguous(), y


def estimate_seed_models(seed: int) -> None:
    print("== finite-size Lyapunov exponent of each seed model (Benettin two-trajectory, float64 twins)")
    print("   Below the spike-flip scale (small eps) an LIF net gives ln(beta) = -0.105;")
    print("   larger perturbations flip spikes, and the finite-size exponent grows with eps.")
    g = torch.Generator().manual_seed(seed)
    x, _ = prototypes_task(32, 64, 10, 20, g)
    torch.manual_seed(seed)
    models = {  # (model, input, the dimension of the input that indexes samples)
        "SpikingMLP 64-128x4-10 (LyapunovSNN)": (SpikingMLP(64, [128] * 4, 10, threshold=0.5), x, 0),
        "RecurrentSpikingMLP 64-128x2-10": (RecurrentSpikingMLP(64, [128, 128], 10), x, 0),
        "SpikingVGG 3x1 blocks, 1x8x8 images": (
            SpikingVGG(1, 10, base_channels=16, num_stages=3, blocks_per_stage=1, input_size=8),
            x.transpose(0, 1).reshape(20, 32, 1, 8, 8), 1),  # a time-first image sequence
    }
    print(f"  {'model':<38} {'eps':>6} {'lambda':>8} {'+-':>6} {'flips':>6} {'time':>6}")
    for name, (model, inp, batch_dim) in models.items():
        for eps in (1e-4, 1e-2, 1e-1):
            t0 = time.perf_counter()
            with torch.no_grad():
                res = finite_difference_lyapunov(model.eval(), inp, batch_dim=batch_dim, eps=eps,
                                                  twin_dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(seed))
            print(f"  {name:<38} {eps:>6g} {float(res):+8.4f} {float(res.per_sample.std()):6.3f} "
                  f"{res.flip_fraction:6.1%} {time.perf_counter() - t0:5.2f}s")


def train_regularized(steps: int, seed: int) -> None:
    print("\n== training SpikingMLP 64-128x4-10 with the Lyapunov penalty (squared, target -0.1,")
    print("   weight 0.3, eps 0.1 so that the estimate sees spike flips, 1/4 of each batch estimated)")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SpikingMLP(64, [128] * 4, 10, threshold=0.5)
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x_test, y_test = prototypes_task(256, 64, 10, 10, g)
    print(f"  {'step':>4} {'loss':>7} {'penalty':>8} {'lambda':>8} {'test acc':>8}")
    for step in range(1, steps + 1):
        x, y = prototypes_task(64, 64, 10, 10, g)
        model.train()
        logits, lam, _ = model(x, compute_lyapunov=True, lyap_eps=0.1, lyap_fraction=0.25)
        penalty = reg(lam)
        loss = F.cross_entropy(logits, y) + penalty
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if step == 1 or step % max(1, steps // 8) == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test)[0].argmax(1) == y_test).float().mean()
            print(f"  {step:>4} {loss.item():7.3f} {penalty.item():8.4f} {lam.item():+8.4f} {acc.item():8.1%}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    estimate_seed_models(args.seed)
    train_regularized(args.steps, args.seed)


if __name__ == "__main__":
    main()
