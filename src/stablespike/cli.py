"""``stablespike`` command line: thin, parses arguments, calls the library, prints.

    stablespike bench depth-scaling --preset quick
    stablespike bench depth-scaling --dataset fashion_mnist --depths 2 4 8 12 --seeds 0 1 2
    stablespike report RUN_DIR
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

from .data import DATASETS, ENCODERS
from .lyapunov import PENALTY_KINDS

PRESETS = {
    # minutes on 2 CPU cores, no network
    "quick": dict(dataset="digits", model="mlp", depths=[2, 6, 10], seeds=[0, 1], epochs=4,
                  batch_size=64, T=8, width=128),
    # seed 002's CIFAR-100 settings, for a GPU
    "paper": dict(dataset="cifar100", model="vgg", depths=[4, 8, 12, 16], seeds=[42], epochs=100,
                  batch_size=128, T=4, augment=True),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stablespike", description="Diagnose and stabilize deep SNN training.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks of the science").add_subparsers(dest="bench", required=True)
    d = bench.add_parser("depth-scaling", help="seed 002: depths x {vanilla, lyapunov} x seeds")
    d.add_argument("--preset", choices=sorted(PRESETS), help="quick: digits on a CPU; paper: CIFAR-100 on a GPU")
    d.add_argument("--dataset", choices=DATASETS)
    d.add_argument("--model", choices=("mlp", "vgg"))
    d.add_argument("--depths", type=_positive_int, nargs="+")
    d.add_argument("--seeds", type=int, nargs="+")
    d.add_argument("--seed", type=int, help="a single seed (seed 002's flag); --seeds takes several")
    d.add_argument("--width", type=_positive_int, help="units per MLP layer")
    d.add_argument("--T", type=_positive_int)
    d.add_argument("--encoder", choices=ENCODERS, default="direct")
    d.add_argument("--epochs", type=_positive_int)
    d.add_argument("--batch_size", type=_positive_int)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--lambda_reg", type=float, default=0.3)
    d.add_argument("--lambda_target", type=float, default=-0.1)
    d.add_argument("--reg_type", choices=PENALTY_KINDS, default="squared")
    d.add_argument("--warmup_epochs", type=int, default=0)
    d.add_argument("--stable_init", action="store_true", help="seed 002's flag: the same as --init stable")
    d.add_argument("--init", choices=("default", "stable", "calibrated", "fluctuation"), default="default",
                   help="calibrated: every layer fires at --target_rate before training")
    d.add_argument("--inits", nargs="+", choices=("default", "stable", "calibrated", "fluctuation"),
                   help="several inits side by side, e.g. --inits default calibrated: vanilla, lyapunov, "
                        "calibrated, calibrated+lyapunov in one report")
    d.add_argument("--target_rate", type=float, default=0.1)
    d.add_argument("--surrogate_slope", type=float, default=25.0,
                   help="fast-sigmoid surrogate slope (seed: 25); 1-2 lets gradients through deep nets")
    d.add_argument("--lyap_threshold", type=float, default=2.0)
    d.add_argument("--lyap_eps", type=float, default=1e-4)
    d.add_argument("--lyap_fraction", type=float, default=1.0)
    d.add_argument("--data_dir")
    d.add_argument("--out_dir", default="runs/depth_scaling")
    d.add_argument("--device", default="cpu")
    d.add_argument("--resume", action="store_true", help="finish the sweep in --out_dir (needs --out_dir)")
    d.add_argument("--jobs", type=_positive_int, default=1,
                   help="independent runs at once in separate processes on this machine")
    d.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="re-render the report of a sweep directory")
    r.add_argument("run_dir")
    return p


def _sweep_config(args):
    from .bench import SweepConfig
    from .train import TrainConfig
    preset = dict(PRESETS.get(args.preset, {}))
    pick = lambda name, default: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)  # noqa: E731
    seeds = args.seeds if args.seeds is not None else ([args.seed] if args.seed is not None else preset.get("seeds", [0]))
    train = TrainConfig(epochs=pick("epochs", 10), batch_size=pick("batch_size", 128), lr=args.lr,
                        lambda_reg=args.lambda_reg, lambda_target=args.lambda_target,
                        reg_type=args.reg_type, lyap_threshold=args.lyap_threshold,
                        warmup_epochs=args.warmup_epochs, lyap_eps=args.lyap_eps,
                        lyap_fraction=args.lyap_fraction, T=pick("T", 8), encoder=args.encoder,
                        augment=preset.get("augment", False), device=args.device,
                        progress=not args.no_progress, seed=seeds[0])
    return SweepConfig(dataset=pick("dataset", "digits"), model=pick("model", "mlp"),
                       depths=pick("depths", [2, 4]), seeds=seeds, width=pick("width", 128),
                       stable_init=args.stable_init, init=args.init, inits=args.inits,
                       target_rate=args.target_rate, surrogate_slope=args.surrogate_slope,
                       data_dir=args.data_dir, train=train)


def main(argv: Optional[List[str]] = None) -> int:
    """Under torchrun every rank runs this; rank 0 alone logs progress, writes and prints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .bench import run_sweep
    from .bench.report import write_report
    from .distributed import broadcast_from_main, setup
    try:
        ranks = setup(getattr(args, "device", "cpu"))
        logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR, format="%(message)s")
        if not ranks.is_main:  # rank 0 shows the same warnings once
            warnings.simplefilter("ignore")
        if args.command == "report":
            print(write_report(args.run_dir))
            return 0
        cfg = _sweep_config(args)
        out_dir = args.out_dir if args.resume else os.path.join(args.out_dir, f"{cfg.dataset}_{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir = broadcast_from_main(out_dir)  # the clocks of the ranks may be a second apart
        run_sweep(cfg, out_dir, resume=args.resume, jobs=args.jobs)
        if ranks.is_main:
            print(write_report(out_dir))
            print(f"\nresults, plots and report in {out_dir}/ (report.md, report.html)")
        return 0
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err).splitlines()[0])  # one line on stderr, exit code 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
