"""Cost of the finite-difference Lyapunov regularizer in a training step, measured side by side.

For each model, these training steps (forward, cross-entropy, penalty, backward, AdamW step) run
interleaved after a warm-up, and the medians are compared with the plain step:

* ``plain``      — no estimate;
* ``full``       — stablespike's estimate on the whole batch (twins batched with the nominal rows,
                   first layer computed once);
* ``fraction``   — the estimate on a random 1/8 of the batch (``lyap_fraction=0.125``);
* ``fraction+r5`` — the same, measuring and renormalizing every 5 steps (``lyap_renorm_every=5``);
* ``seed-style`` — the seeds' way, as a reference: the twin trajectory stepped separately
                   (MLP only; REFERENCES.md measured 2.1-2.3x on this machine).

It also checks that the sub-batch estimates track the full-batch one: the mean exponent over
20 batches with ``fraction=0.125`` (and with ``renorm_every=5``) against the full-batch mean.

    python benchmarks/lyapunov_overhead.py            # MLP depths 2/4/8 and a small VGG
    python benchmarks/lyapunov_overhead.py --quick    # fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

from stablespike import LyapunovRegularizer, SpikingMLP, SpikingVGG
from _timing import time_paired

warnings.filterwarnings("ignore", message="eps=", category=RuntimeWarning)


def seed_style_forward(model: SpikingMLP, x: torch.Tensor, eps: float):
    """Seed 001's loop: nominal and perturbed trajectories stepped separately, no sharing."""
    B, T, _ = x.shape
    L = model.num_layers
    mems = [torch.zeros(B, h) for h in model.hidden_dims]
    mems_p = [m + eps * torch.randn_like(m) for m in mems]
    total, acc = 0.0, torch.zeros(B)
    for t in range(T):
        h, h_p = x[:, t], x[:, t]
        for i in range(L):
            h, mems[i] = model.lifs[i](model.linears[i](h), mems[i])
            h_p, mems_p[i] = model.lifs[i](model.linears[i](h_p), mems_p[i])
        total = total + h
        diffs = [mems_p[i] - mems[i] for i in range(L)]
        delta = torch.sqrt(sum(d.pow(2).sum(1) for d in diffs) + 1e-12)
        acc = acc + torch.log(delta / eps + 1e-12)
        mems_p = [mems[i] + diffs[i] * (eps / delta).unsqueeze(1) for i in range(L)]
    return model.readout(total), (acc / T).mean()


VARIANTS = {
    "plain": {},
    "full": {"compute_lyapunov": True},
    "fraction": {"compute_lyapunov": True, "lyap_fraction": 0.125},
    "fraction+r5": {"compute_lyapunov": True, "lyap_fraction": 0.125, "lyap_renorm_every": 5},
}


def make_step(model, x, y, variant: str, reg: LyapunovRegularizer):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        if variant == "seed-style":
            logits, lam = seed_style_forward(model, x, 1e-4)
        else:
            logits, lam, _ = model(x, **VARIANTS[variant])
        loss = F.cross_entropy(logits, y)
        if lam is not None:
            loss = loss + reg(lam)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return step


def fraction_agreement(model, batches) -> dict:
    """Mean exponent over the batches for the full, fraction and fraction+r5 estimates."""
    means = {}
    for name in ("full", "fraction", "fraction+r5"):
        torch.manual_seed(0)
        with torch.no_grad():
            means[name] = statistics.fmean(float(model(x, **VARIANTS[name])[1]) for x in batches)
    return means


def bench_model(name, build, make_input, variants, args, reg, agreement_batches=20):
    torch.manual_seed(0)
    x, y = make_input()
    models = {v: build() for v in variants}  # one model per variant: optimizer states stay apart
    for m in models.values():
        m.load_state_dict(models[variants[0]].state_dict())
        m.train()
    steps = {v: make_step(models[v], x, y, v, reg) for v in variants}
    med, ratio = time_paired(steps, "plain", args.warmup, args.reps)
    row = {"model": name, "plain_ms": 1e3 * med["plain"]}
    for v in variants[1:]:
        row[f"{v}_ratio"] = ratio[v]  # median over repetitions of the paired ratio
    probe = build().eval()
    means = fraction_agreement(probe, [make_input()[0] for _ in range(agreement_batches)])
    row.update({f"lambda_{k}": v for k, v in means.items()})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up")
    p.add_argument("--no-vgg", action="store_true")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 5, 1
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    T, B = 25, 64
    rows = []
    for d in args.depths:
        rows.append(bench_model(
            f"MLP 784-256x{d}-10 T={T} B={B}",
            lambda: SpikingMLP(784, [256] * d, 10),
            lambda: (torch.rand(B, T, 784), torch.randint(0, 10, (B,))),
            ["plain", "full", "fraction", "fraction+r5", "seed-style"], args, reg))
        print(_fmt(rows[-1]), flush=True)
    if not args.no_vgg:
        Tv, Bv = 4, 32
        rows.append(bench_model(
            f"VGG 3 stages x1 block, 16 ch, 32x32, T={Tv} B={Bv}",
            lambda: SpikingVGG(3, 10, base_channels=16, num_stages=3, blocks_per_stage=1, T=Tv),
            lambda: (torch.rand(Bv, 3, 32, 32), torch.randint(0, 10, (Bv,))),
            ["plain", "full", "fraction", "fraction+r5"], args, reg))
        print(_fmt(rows[-1]), flush=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"ratios: median over {args.reps} interleaved reps of the paired ratio, after {args.warmup} warm-up")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def _fmt(row) -> str:
    ratios = "  ".join(f"{k[:-6]} {v:.2f}x" for k, v in row.items() if k.endswith("_ratio"))
    lams = " / ".join(f"{k[7:]} {v:+.3f}" for k, v in row.items() if k.startswith("lambda_"))
    return f"{row['model']:<46} plain {row['plain_ms']:6.1f} ms  {ratios}  mean lambda: {lams}"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
