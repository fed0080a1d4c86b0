"""Does a Lyapunov penalty control the exponent it measures?

A 3-layer spiking MLP (64-128x3-10, threshold 0.5, weights x2, so that its finite-size exponent
at eps 0.1 is positive) is trained on the penalty alone, (lambda - target)^2 with Adam, from the
same initialization, with two estimates of lambda side by side:

* finite difference: the finite-size exponent (eps 0.1, a fresh perturbation each step);
* tangent: the top exponent of the tangent spectrum (the estimate gradient flossing penalizes).

For each seed it prints the exponent before training and the number of optimizer steps until the
penalized estimate is within 0.05 of the target (or "> steps"), and the exponent at the end.

    python benchmarks/penalty_control.py [--target -0.5] [--steps 150] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch

from stablespike import SpikingMLP, finite_difference_lyapunov, tangent_spectrum


def exponent(model, x, arm: str, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    if arm == "finite difference":
        return finite_difference_lyapunov(model, x, batch_dim=0, eps=0.1, generator=gen).exponent
    return tangent_spectrum(model, x, batch_dim=0, k=1, generator=gen).exponents[0]


def control(model, x, arm: str, target: float, steps: int, lr: float):
    """(exponent before, steps to within 0.05 of target or None, exponent at the end)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first, reached = None, None
    for step in range(steps + 1):
        lam = exponent(model, x, arm, step)
        first = float(lam.detach()) if first is None else first
        if reached is None and abs(float(lam.detach()) - target) <= 0.05:
            reached = step
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        ((lam - target) ** 2).backward()
        opt.step()
    return first, reached, float(lam.detach())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=-0.5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"target {args.target}, Adam lr {args.lr}, at most {args.steps} steps\n")
    print("| seed | penalized estimate | exponent before | steps to within 0.05 | exponent after |\n|---|---|---|---|---|")
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = SpikingMLP(64, [128] * 3, 10, threshold=0.5)
        with torch.no_grad():
            for linear in model.linears:
                linear.weight.mul_(2.0)
        x = torch.rand(16, 20, 64, generator=torch.Generator().manual_seed(seed))
        for arm in ("finite difference", "tangent"):
            before, reached, after = control(copy.deepcopy(model), x, arm, args.target, args.steps, args.lr)
            steps = f"> {args.steps}" if reached is None else str(reached)
            print(f"| {seed} | {arm} | {before:+.3f} | {steps} | {after:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
