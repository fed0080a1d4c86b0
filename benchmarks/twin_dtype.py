"""What float64 twins cost: a training step with the Lyapunov penalty, its estimate run in float32
(the model's own dtype) against float64 (``lyap_dtype=torch.float64``), side by side.

Why: the seeds' perturbation (eps=1e-4) spread over a layer's membranes falls below what float32
resolves (the estimator warns). Two cures: run the twins in float64 automatically, or make the
training default an eps that float32 resolves (1e-2). The first is only a default if it is cheap.

Each step: forward with the estimate, cross-entropy + penalty, backward, AdamW (the estimate's
cost is a training cost). The two variants alternate in rotating order after a warm-up; the ratio
is the median over repetitions of (float64 step / float32 step in the same repetition). Models
at the sizes ``make demo`` and the quick bench preset use:

* ``demo-mlp``  SpikingMLP 64-128x4-10, T=10, B=64, a quarter of the batch estimated (examples/demo.py)
* ``quick-mlp`` SpikingMLP 64-128x10-10, T=8, B=128, whole batch (the quick preset's widest model)
* ``demo-rnn``  RecurrentSpikingMLP 64-128x2-10, T=20, B=32 (examples/demo.py)
* ``demo-vgg``  SpikingVGG 3 stages x 1 block, 16 channels, 1x8x8 images, T=20, B=32 (examples/demo.py)

    python benchmarks/twin_dtype.py [--reps 11] [--models demo-mlp quick-mlp]
"""
from __future__ import annotations

import argparse
import platform
import warnings

import torch
import torch.nn.functional as F

from stablespike import LyapunovRegularizer, RecurrentSpikingMLP, SpikingMLP, SpikingVGG
from _timing import time_paired

# float32 twins at eps=1e-4 warn (that is the point); the timing does not depend on eps
warnings.filterwarnings("ignore", message="eps=", category=RuntimeWarning)


def _models():
    """name -> (model, input ``(B, T, 64)`` batch-first or ``(B, 1, 8, 8)`` images, fraction)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "demo-mlp": (SpikingMLP(64, [128] * 4, 10, threshold=0.5), torch.rand(64, 10, 64, generator=g), 0.25),
        "quick-mlp": (SpikingMLP(64, [128] * 10, 10), torch.rand(128, 8, 64, generator=g), 1.0),
        "demo-rnn": (RecurrentSpikingMLP(64, [128, 128], 10), torch.rand(32, 20, 64, generator=g), 1.0),
        "demo-vgg": (SpikingVGG(1, 10, base_channels=16, num_stages=3, blocks_per_stage=1, input_size=8, T=20),
                     torch.rand(32, 1, 8, 8, generator=g), 1.0),
    }


def step_fn(model, x, fraction, dtype):
    """One training step whose estimate runs in ``dtype`` (None: the model's float32)."""
    y = torch.arange(x.shape[0]) % 10
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits, lam, _ = model(x, compute_lyapunov=True, lyap_eps=1e-4, lyap_fraction=fraction, lyap_dtype=dtype)
        loss = F.cross_entropy(logits, y) + reg(lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(_models()))
    args = parser.parse_args()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median of {args.reps} after {args.warmup} warm-ups")
    print(f"{'model':<10} {'float32 step':>13} {'float64 step':>13} {'float64/float32':>16}")
    models = _models()
    for name in args.models:
        model, x, fraction = models[name]
        variants = {"float32": step_fn(model, x, fraction, None),
                    "float64": step_fn(model, x, fraction, torch.float64)}
        medians, ratios = time_paired(variants, "float32", args.warmup, args.reps)
        print(f"{name:<10} {medians['float32'] * 1e3:>10.1f} ms {medians['float64'] * 1e3:>10.1f} ms "
              f"{ratios['float64']:>15.2f}x")


if __name__ == "__main__":
    main()
