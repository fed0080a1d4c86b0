"""Cost of the finite-difference Lyapunov regularizer in a training step, measured side by side.

For each model, these training steps (forward, cross-entropy, penalty, backward, AdamW step) run
interleaved after a warm-up, and the medians are compared with the plain step:

* ``plain``      — no estimate;
* ``full``       — stablespike's estimate on the whole batch (a twin row per sample, run through
                   the model's own forward with the samples);
* ``fraction``   — the estimate on a random 1/8 of the batch (``lyap_fraction=0.125``);
* ``fraction+r5`` — the same, measuring and renormalizing every 5 steps (``lyap_renorm_every=5``);
* ``seed-style`` — the seeds' way, as a reference: seed 001's twin trajectory stepped separately
                   for the MLP (REFERENCES.md measured 2.1-2.3x on this machine), seed 002's P=2
                   batched loop for the VGG;
* ``+1/8 samples``, ``2x samples`` — the plain step on a batch with as many more samples as the
                   fraction and the full estimate add twin rows: what the rows alone cost the model
                   on this machine, with no estimate at all. (Twins skip the layers before the
                   first neuron, so an estimate can come in a little under it.)

Each model is measured in its own fresh Python process: what one model's steps leave in the
memory allocator and the caches changed the next model's ratios by up to 1x.

It also checks that the sub-batch estimates track the full-batch one: the mean exponent over
20 batches with ``fraction=0.125`` (and with ``renorm_every=5``) against the full-batch mean.

The models: the library's MLP and VGG (through their seed API, ``compute_lyapunov=True``), and
two models written as their frameworks' tutorials write them, through
``finite_difference_lyapunov(net, x, forward=...)`` in the user's own step: an snnTorch
convolutional ``nn.Sequential`` with ``init_hidden=True`` (tutorial 7) and a spikingjelly
multi-step CSNN with batch norm (the Fashion-MNIST tutorial, narrower).

    python benchmarks/lyapunov_overhead.py            # all four models
    python benchmarks/lyapunov_overhead.py --quick    # fewer repetitions
    python benchmarks/lyapunov_overhead.py --models mlp:4 snntorch-conv
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F

from stablespike import LyapunovRegularizer, SpikingMLP, SpikingVGG, finite_difference_lyapunov
from _timing import time_paired

warnings.filterwarnings("ignore", message="eps=", category=RuntimeWarning)
# the CSNN is multi-step: per-layer renormalization is what it gets, as the docs say
warnings.filterwarnings("ignore", message="finite_difference_lyapunov: the model's multi-step", category=RuntimeWarning)


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


def snntorch_conv(num_steps: int):
    """snnTorch tutorial 7's network for 28x28 images, and its ``forward_pass``."""
    import snntorch as snn
    from snntorch import surrogate, utils
    grad = surrogate.fast_sigmoid(slope=25)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 12, 5), torch.nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True),
        torch.nn.Conv2d(12, 64, 5), torch.nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True),
        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True, output=True))

    def forward_pass(net, data):
        spk_rec = []
        utils.reset(net)
        for _ in range(num_steps):
            spk_out, mem_out = net(data)
            spk_rec.append(spk_out)
        return torch.stack(spk_rec)  # (T, B, 10)
    return net, forward_pass


def spikingjelly_csnn(channels: int):
    """spikingjelly's Fashion-MNIST CSNN (Conv-BN-IF x2, then fully connected), multi-step."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    net = torch.nn.Sequential(
        layer.Conv2d(1, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels),
        neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Conv2d(channels, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels),
        neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(channels * 7 * 7, channels * 4 * 4, bias=False),
        neuron.IFNode(surrogate_function=surrogate.ATan()), layer.Linear(channels * 4 * 4, 10, bias=False),
        neuron.IFNode(surrogate_function=surrogate.ATan()))
    functional.set_step_mode(net, "m")

    def forward(net, x_seq):
        functional.reset_net(net)
        return net(x_seq)  # (T, B, 10)
    return net, forward


class UserModel(torch.nn.Module):
    """A user's network and its forward, for the benchmark's steps: ``(logits, lam or None)``."""

    def __init__(self, net, forward, batch_dim: int):
        super().__init__()
        self.net, self.forward_fn, self.batch_dim = net, forward, batch_dim

    def forward(self, x, compute_lyapunov=False, lyap_fraction=1.0, lyap_renorm_every=1):
        if not compute_lyapunov:
            return self.forward_fn(self.net, x).mean(0), None, None
        res = finite_difference_lyapunov(self.net, x, forward=self.forward_fn, batch_dim=self.batch_dim,
                                         fraction=lyap_fraction, renorm_every=lyap_renorm_every)
        return res.outputs.mean(0), res.exponent, None


# the plain step on more samples: variant -> (share of the batch added, as the estimate adds twins)
MORE_SAMPLES = {"+1/8 samples": 0.125, "2x samples": 1.0}


def with_more_samples(x: torch.Tensor, y: torch.Tensor, share: float, batch_dim: int):
    """``x`` and ``y`` with copies of their first ``ceil(share * B)`` samples appended."""
    k = math.ceil(share * y.shape[0])
    return torch.cat([x, x.narrow(batch_dim, 0, k)], dim=batch_dim), torch.cat([y, y[:k]])


def make_step(model, x, y, variant: str, reg: LyapunovRegularizer, batch_dim: int = 0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    if variant in MORE_SAMPLES:
        x, y = with_more_samples(x, y, MORE_SAMPLES[variant], batch_dim)
        variant = "plain"

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


def bench_model(name, build, make_input, variants, args, reg, agreement_batches=20, batch_dim=0):
    torch.manual_seed(0)
    x, y = make_input()
    variants = variants + list(MORE_SAMPLES)
    models = {v: build() for v in variants}  # one model per variant: optimizer states stay apart
    for m in models.values():
        m.load_state_dict(models[variants[0]].state_dict())
        m.train()
    steps = {v: make_step(models[v], x, y, v, reg, batch_dim) for v in variants}
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
    p.add_argument("--models", nargs="+", default=["mlp:4", "vgg", "snntorch-conv", "sj-csnn"],
                   help="mlp:DEPTH, vgg, snntorch-conv, sj-csnn")
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up")
    p.add_argument("--vgg-batch", type=int, default=32, help="the VGG's batch size (seed 002 trains with 128)")
    p.add_argument("--no-seed-style", action="store_true", help="leave out the seed-style reference")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one model, in this process
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
    rows = []
    for spec in args.models:
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
    """Benchmark one model: ``mlp:D`` (784-256xD-10, T=25, B=64), ``vgg``, ``snntorch-conv``
    (tutorial 7, 28x28, T=10, B=64) or ``sj-csnn`` (32 channels, 28x28, T=4, B=64)."""
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    variants = ["plain", "full", "fraction", "fraction+r5"]
    if spec in ("snntorch-conv", "sj-csnn"):
        T, B = (10, 64) if spec == "snntorch-conv" else (4, 64)
        if spec == "snntorch-conv":  # a static image, repeated by the forward: samples along dim 0
            build = lambda: UserModel(*snntorch_conv(T), batch_dim=0)  # noqa: E731
            make = lambda: (torch.rand(B, 1, 28, 28), torch.randint(0, 10, (B,)))  # noqa: E731
        else:  # spikingjelly's multi-step input (T, B, C, H, W)
            build = lambda: UserModel(*spikingjelly_csnn(32), batch_dim=1)  # noqa: E731
            make = lambda: (torch.rand(1, B, 1, 28, 28).expand(T, B, 1, 28, 28), torch.randint(0, 10, (B,)))  # noqa: E731
        name = ("snnTorch tutorial-7 conv, 28x28, T=10 B=64" if spec == "snntorch-conv"
                else "spikingjelly CSNN 32 ch, BN, 28x28, T=4 B=64")
        return bench_model(name, build, make, variants, args, reg, batch_dim=0 if spec == "snntorch-conv" else 1)
    variants += [] if args.no_seed_style else ["seed-style"]
    if spec.startswith("mlp:"):
        d, T, B = int(spec[4:]), 25, 64
        return bench_model(f"MLP 784-256x{d}-10 T={T} B={B}", lambda: SpikingMLP(784, [256] * d, 10),
                           lambda: (torch.rand(B, T, 784), torch.randint(0, 10, (B,))), variants, args, reg)
    T, B = 4, args.vgg_batch
    return bench_model(f"VGG 3 stages x1 block, 16 ch, 32x32, T={T} B={B}",
                       lambda: SpikingVGG(3, 10, base_channels=16, num_stages=3, blocks_per_stage=1, T=T, input_size=32),
                       lambda: (torch.rand(B, 3, 32, 32), torch.randint(0, 10, (B,))), variants, args, reg)


def _fmt(row) -> str:
    ratios = "  ".join(f"{k[:-6]} {v:.2f}x" for k, v in row.items() if k.endswith("_ratio"))
    lams = " / ".join(f"{k[7:]} {v:+.3f}" for k, v in row.items() if k.startswith("lambda_"))
    return f"{row['model']:<46} plain {row['plain_ms']:6.1f} ms  {ratios}  mean lambda: {lams}"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
