"""Cost of the finite-difference Lyapunov regularizer in a training step, measured side by side.

For each model, these training steps (forward, cross-entropy, penalty, backward, AdamW step) run
interleaved after a warm-up, and the medians are compared with the plain step:

* ``plain``      — no estimate;
* ``full``       — stablespike's estimate on the whole batch (twins batched with the nominal rows,
                   first layer computed once);
* ``fraction``   — the estimate on a random 1/8 of the batch (``lyap_fraction=0.125``);
* ``fraction+r5`` — the same, measuring and renormalizing every 5 steps (``lyap_renorm_every=5``);
* ``seed-style`` — the seeds' way, as a reference: seed 001's twin trajectory stepped separately
                   for the MLP (REFERENCES.md measured 2.1-2.3x on this machine), seed 002's P=2
                   batched loop for the VGG.

Each model is measured in its own fresh Python process: what one model's steps leave in the
memory allocator and the caches changed the next model's ratios by up to 1x.

It also checks that the sub-batch estimates track the full-batch one: the mean exponent over
20 batches with ``fraction=0.125`` (and with ``renorm_every=5``) against the full-batch mean.

    python benchmarks/lyapunov_overhead.py            # MLP depths 2/4/8 and a small VGG
    python benchmarks/lyapunov_overhead.py --quick    # fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def seed_style_vgg_forward(model: SpikingVGG, x: torch.Tensor, eps: float):
    """Seed 002's loop: both trajectories batched as P=2 (batch-norm statistics over 2B rows), the
    first block's conv+BN computed once, global renormalization rebuilt with torch.stack."""
    B, P, T = x.shape[0], 2, model.T
    mems = [torch.zeros(P, B, *shape) for shape in model._block_shapes]
    mems = [torch.stack([m[0], m[0] + eps * torch.randn_like(m[0])]) for m in mems]
    acc, total = torch.zeros(B), 0.0
    for _ in range(T):
        new, h, k = [], None, 0
        for stage, pool in zip(model.stages, model.pools):
            for block in stage:
                if k == 0:
                    cur = block.bn(block.conv(x)).unsqueeze(0).expand(P, *([-1] * 4)).reshape(P * B, *mems[0].shape[2:])
                else:
                    cur = block.bn(block.conv(h.reshape(P * B, *h.shape[2:])))
                spk, mem = block.lif(cur, mems[k].reshape(P * B, *mems[k].shape[2:]))
                h, k = spk.view(P, B, *spk.shape[1:]), k + 1
                new.append(mem.view(P, B, *mem.shape[1:]))
            pooled = pool(h.reshape(P * B, *h.shape[2:]))
            h = pooled.view(P, B, *pooled.shape[1:])
        total = total + h[0].reshape(B, -1)
        delta = torch.sqrt(sum(((m[1] - m[0]) ** 2).flatten(1).sum(1) for m in new) + 1e-12)
        acc = acc + torch.log(delta / eps + 1e-12)
        scale = (eps / delta).view(B, 1, 1, 1)
        mems = [torch.stack([m[0], m[0] + (m[1] - m[0]) * scale]) for m in new]
    return model.fc(model.dropout(total)), (acc / T).mean()


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
            seed_forward = seed_style_vgg_forward if isinstance(model, SpikingVGG) else seed_style_forward
            logits, lam = seed_forward(model, x, 1e-4)
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
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up")
    p.add_argument("--no-vgg", action="store_true")
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--vgg-batch", type=int, default=32, help="the VGG's batch size (seed 002 trains with 128)")
    p.add_argument("--no-seed-style", action="store_true", help="leave out the seed-style reference")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one model, in this process: "mlp:D" or "vgg"
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 5, 1
    if args.only:
        row = bench_one(args.only, args)
        with open(args.json, "w") as f:
            json.dump(row, f)
        return [row]
    # every model in a fresh process: what one model leaves in the allocator and caches changed
    # the next one's ratios by up to 1x (the VGG's full-batch ratio read 3.4x after the MLPs, 2.3x alone)
    models = ([] if args.no_mlp else [f"mlp:{d}" for d in args.depths]) + ([] if args.no_vgg else ["vgg"])
    rows = []
    for spec in models:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--only", spec, "--json", out,
                   "--reps", str(args.reps), "--warmup", str(args.warmup), "--vgg-batch", str(args.vgg_batch)]
            subprocess.run(cmd + (["--no-seed-style"] if args.no_seed_style else []), check=True)
            with open(out) as f:
                rows.append(json.load(f))
        print(_fmt(rows[-1]), flush=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"each model in its own process; ratios: median over {args.reps} interleaved reps of the "
          f"paired ratio, after {args.warmup} warm-up")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def bench_one(spec: str, args) -> dict:
    """Benchmark one model: ``mlp:D`` (784-256xD-10, T=25, B=64) or ``vgg``."""
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    variants = ["plain", "full", "fraction", "fraction+r5"] + ([] if args.no_seed_style else ["seed-style"])
    if spec.startswith("mlp:"):
        d, T, B = int(spec[4:]), 25, 64
        return bench_model(f"MLP 784-256x{d}-10 T={T} B={B}", lambda: SpikingMLP(784, [256] * d, 10),
                           lambda: (torch.rand(B, T, 784), torch.randint(0, 10, (B,))), variants, args, reg)
    T, B = 4, args.vgg_batch
    return bench_model(f"VGG 3 stages x1 block, 16 ch, 32x32, T={T} B={B}",
                       lambda: SpikingVGG(3, 10, base_channels=16, num_stages=3, blocks_per_stage=1, T=T),
                       lambda: (torch.rand(B, 3, 32, 32), torch.randint(0, 10, (B,))), variants, args, reg)


def _fmt(row) -> str:
    ratios = "  ".join(f"{k[:-6]} {v:.2f}x" for k, v in row.items() if k.endswith("_ratio"))
    lams = " / ".join(f"{k[7:]} {v:+.3f}" for k, v in row.items() if k.startswith("lambda_"))
    return f"{row['model']:<46} plain {row['plain_ms']:6.1f} ms  {ratios}  mean lambda: {lams}"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
