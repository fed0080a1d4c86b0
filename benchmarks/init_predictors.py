"""Which measure taken at initialization predicts a run's final accuracy?

For every finished run of the given sweep directories, the model is rebuilt exactly as the run
built it before training (same seed, same init, calibration included) and measured on a fixed
batch of test samples: the finite-size exponent (finite difference, eps 0.01), the top tangent
exponent, the depth-wise gain (nats per layer), and the per-layer firing rates (their minimum over
layers and their mean). Each measure's Spearman rank correlation with the final test accuracy
over all runs is printed as a table, with the number of runs.

    python benchmarks/init_predictors.py runs/fashion_mlp_seed runs/fashion_mlp_cure [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import numpy as np
import torch

from stablespike import depthwise_gain, finite_difference_lyapunov, tangent_spectrum
from stablespike.bench.depth_scaling import SweepConfig, _dataset, build_model, run_keys
from stablespike.streaming import FiringRateMonitor
from stablespike.train import model_input

MEASURES = ("finite-size exponent", "tangent top exponent", "depth-wise gain",
            "lowest layer rate", "mean layer rate")


def measure_at_init(cfg: SweepConfig, key, data, batch: int) -> dict:
    """The five measures of the run ``key``'s model before training."""
    torch.manual_seed(key.seed)  # as run_one builds it
    model = build_model(cfg, key.depth, data, key.init)
    model.eval()
    x = model_input(model, data.x_test[:batch], cfg.train)
    gen = lambda: torch.Generator().manual_seed(key.seed)  # noqa: E731
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)  # silent nets floor the gain: ranks still hold
        fd = float(finite_difference_lyapunov(model, x, batch_dim=0, eps=1e-2, generator=gen()))
        top = float(tangent_spectrum(model, x, batch_dim=0, k=1, generator=gen()).exponents[0])
        gain = depthwise_gain(model, x, batch_dim=0, generator=gen()).mean if key.depth > 1 else math.nan
        with FiringRateMonitor(model) as rates:
            model(x)
    layer_rates = [row["mean"] for row in rates.table()]
    return dict(zip(MEASURES, (fd, top, gain, min(layer_rates), float(np.mean(layer_rates)))))


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties), over the pairs where both are finite."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return math.nan

    def ranks(v):
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    ra, rb = ranks(a[keep]), ranks(b[keep])
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else math.nan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", help="sweep directories (their config.json and runs/*.json)")
    p.add_argument("--batch", type=int, default=32, help="test samples the measures are taken on")
    args = p.parse_args(argv)
    rows = []
    for sweep in args.sweeps:
        with open(os.path.join(sweep, "config.json")) as f:
            cfg = SweepConfig.from_dict(json.load(f), device="cpu")
        data = _dataset(cfg)
        for key in run_keys(cfg):
            path = os.path.join(sweep, "runs", key.name + ".json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                run = json.load(f)
            acc = run["history"][-1]["test_acc"] if run["status"] == "OK" and run["history"] else math.nan
            rows.append({"run": f"{os.path.basename(sweep)}/{key.name}", "acc": acc,
                         **measure_at_init(cfg, key, data, args.batch)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(rows)} runs; Spearman rank correlation of each measure at init with the final "
          "test accuracy:\n")
    print("| measure at initialization | rank correlation with final accuracy |\n|---|---|")
    for m in MEASURES:
        print(f"| {m} | {spearman([r[m] for r in rows], [r['acc'] for r in rows]):+.2f} |")


if __name__ == "__main__":
    main()
