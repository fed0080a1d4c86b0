"""``stablespike`` command line: thin, parses arguments, calls the library, prints.

    stablespike bench depth-scaling --preset quick
    stablespike bench depth-scaling --dataset fashion_mnist --depths 2 4 8 12 --seeds 0 1 2
    stablespike report RUN_DIR
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2): the usage block
    would bury the message; ``--help`` shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _DefaultsShown(argparse.HelpFormatter):
    """``--help`` shows each option's default: from the parser, unless the help text already says
    it (options a preset may set, whose parser default is None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: a default of 0 (--warmup_epochs) equals False but is worth showing
        if "(default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _finite(text: str) -> float:
    """A float option's value: NaN and inf are refused here, with the option's name."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


# Defaults of the options a preset may set (None in the parser: "not given, take the preset's").
DEFAULTS = dict(dataset="digits", model="mlp", depths=[2, 4], seeds=[0], epochs=10, batch_size=128, T=8)


def _preset_default(name: str, text: str = "") -> str:
    """Help text with the default and what each preset sets instead."""
    presets = "; ".join(f"--preset {p}: {_shown(v[name])}" for p, v in PRESETS.items() if name in v)
    default = DEFAULTS.get(name)
    return (f"{text + ' ' if text else ''}(default: {_shown(default)}" + (f"; {presets}" if presets else "")
            + ")").replace("%", "%%")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stablespike", description="Diagnose and stabilize deep SNN training.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks of the science").add_subparsers(dest="bench", required=True)
    d = bench.add_parser("depth-scaling", help="seed 002: depths x {vanilla, lyapunov} x seeds",
                         formatter_class=_DefaultsShown)
    d.add_argument("--preset", choices=sorted(PRESETS), help="quick: digits on a CPU; paper: CIFAR-100 on a GPU (default: none, the defaults below)")
    d.add_argument("--dataset", choices=DATASETS, help=_preset_default("dataset"))
    d.add_argument("--model", choices=("mlp", "vgg"), help=_preset_default("model"))
    d.add_argument("--depths", type=_positive_int, nargs="+", help=_preset_default("depths"))
    d.add_argument("--seeds", type=int, nargs="+", help=_preset_default("seeds"))
    d.add_argument("--seed", type=int, help="a single seed (seed 002's flag); --seeds takes several (default: none, --seeds applies)")
    d.add_argument("--width", type=_positive_int,
                   help="units per MLP layer, or the VGG's base channels (doubled each stage) "
                        "(default: 128 for the MLP, 64 for the VGG; --preset quick: 128)")
    d.add_argument("--train_subset", type=_positive_int,
                   help="train on this many samples, drawn per class in proportion (seeded by the "
                        "first seed) (default: all)")
    d.add_argument("--test_subset", type=_positive_int, help="test on this many, drawn alike (default: all)")
    d.add_argument("--T", type=_positive_int, help=_preset_default("T", "time steps"))
    d.add_argument("--encoder", choices=ENCODERS, default="direct", help="input encoding")
    d.add_argument("--epochs", type=_positive_int, help=_preset_default("epochs"))
    d.add_argument("--batch_size", type=_positive_int, help=_preset_default("batch_size"))
    d.add_argument("--lr", type=_finite, default=1e-3, help="AdamW learning rate")
    d.add_argument("--lambda_reg", type=_finite, default=0.3, help="weight of the Lyapunov penalty")
    d.add_argument("--lambda_target", type=_finite, default=-0.1, help="target exponent of the penalty")
    d.add_argument("--reg_type", choices=PENALTY_KINDS, default="squared", help="penalty kind")
    d.add_argument("--warmup_epochs", type=int, default=0, help="epochs before the penalty starts")
    d.add_argument("--stable_init", action="store_true", help="seed 002's flag: the same as --init stable")
    d.add_argument("--init", choices=("default", "stable", "calibrated", "fluctuation"), default="default",
                   help="calibrated: every layer fires at --target_rate before training")
    d.add_argument("--inits", nargs="+", choices=("default", "stable", "calibrated", "fluctuation"),
                   help="several inits side by side, e.g. --inits default calibrated: vanilla, lyapunov, "
                        "calibrated, calibrated+lyapunov in one report (default: --init alone)")
    d.add_argument("--target_rate", type=_finite, default=0.1, help="firing rate of calibrated inits")
    d.add_argument("--surrogate_slope", type=_finite, default=25.0,
                   help="fast-sigmoid surrogate slope (seed: 25); 1-2 lets gradients through deep nets")
    d.add_argument("--lyap_threshold", type=_finite, default=2.0, help="threshold of the penalty kinds that use one")
    d.add_argument("--lyap_eps", type=_finite, default=1e-2,
                   help="finite-difference perturbation size (seed 002: 1e-4, below what float32 twins resolve)")
    d.add_argument("--lyap_fraction", type=_finite, default=1.0, help="share of each batch estimated")
    d.add_argument("--grad_clip", type=_finite, default=10.0, help="gradient-norm clipping (seed: 10)")
    d.add_argument("--data_dir", help="where the data files are (default: Debian's copy for Fashion-MNIST)")
    d.add_argument("--out_dir", default="runs/depth_scaling",
                   help="where a sweep goes: a new time-stamped folder inside it (with --resume: itself)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    d.add_argument("--resume", action="store_true",
                   help="finish (or start) the sweep in --out_dir itself, with no time-stamped folder")
    d.add_argument("--jobs", type=_positive_int, default=1,
                   help="independent runs at once in separate processes on this machine")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = sub.add_parser("report", help="re-render the report of a sweep directory")
    r.add_argument("run_dir")
    return p


def _sweep_config(args):
    from .bench import SweepConfig
    from .train import TrainConfig
    preset = dict(PRESETS.get(args.preset, {}))
    pick = lambda name, default: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)  # noqa: E731
    seeds = args.seeds if args.seeds is not None else ([args.seed] if args.seed is not None else
                                                       preset.get("seeds", DEFAULTS["seeds"]))
    train = TrainConfig(epochs=pick("epochs", DEFAULTS["epochs"]), batch_size=pick("batch_size", DEFAULTS["batch_size"]), lr=args.lr,
                        lambda_reg=args.lambda_reg, lambda_target=args.lambda_target,
                        reg_type=args.reg_type, lyap_threshold=args.lyap_threshold,
                        warmup_epochs=args.warmup_epochs, lyap_eps=args.lyap_eps,
                        lyap_fraction=args.lyap_fraction, grad_clip=args.grad_clip, T=pick("T", DEFAULTS["T"]),
                        encoder=args.encoder, augment=preset.get("augment", False), device=args.device,
                        progress=not args.no_progress, seed=seeds[0] if seeds and seeds[0] >= 0 else 0)
    return SweepConfig(dataset=pick("dataset", DEFAULTS["dataset"]), model=pick("model", DEFAULTS["model"]),
                       depths=pick("depths", DEFAULTS["depths"]), seeds=seeds, width=pick("width", None),
                       train_subset=args.train_subset, test_subset=args.test_subset,
                       stable_init=args.stable_init, init=args.init, inits=args.inits,
                       target_rate=args.target_rate, surrogate_slope=args.surrogate_slope,
                       data_dir=args.data_dir, train=train)


def _flag(option: str, args) -> str:
    """The flag the user typed for a config field (``seeds`` may have come as ``--seed``)."""
    if option == "seeds" and getattr(args, "seeds", None) is None and getattr(args, "seed", None) is not None:
        return "--seed"
    if option == "out_dir" and getattr(args, "command", None) == "report":
        return "RUN_DIR"
    return f"--{option}"


def _resume_hint(argv: List[str], out_dir: str) -> str:
    """The command line that finishes the interrupted sweep in ``out_dir``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out_dir":
            skip = True
        elif not (arg.startswith("--out_dir=") or arg == "--resume"):
            kept.append(arg)
    return shlex.join(["stablespike", *kept, "--out_dir", out_dir, "--resume"])


def main(argv: Optional[List[str]] = None) -> int:
    """Under torchrun every rank runs this; rank 0 alone logs progress, writes and prints.

    Exit codes: 0 done; 2 an expected failure (a bad option, an unavailable device, an output
    that cannot be written, a run file that cannot be used), one line on stderr naming the option
    or file; 130 interrupted (Ctrl-C), one line saying how to resume. A traceback means a bug.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    from .bench import run_sweep
    from .bench.report import write_report
    from .distributed import broadcast_from_main, setup
    from .options import OptionError
    _OOM = getattr(torch, "OutOfMemoryError", MemoryError)  # torch >= 2.5 names CUDA's
    out_dir, is_main = None, True
    try:
        cfg = _sweep_config(args) if args.command == "bench" else None  # every option, before any work
        ranks = setup(cfg.train.device if cfg else "cpu")
        is_main = ranks.is_main
        logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR, format="%(message)s")
        if not ranks.is_main:  # rank 0 shows the same warnings once
            warnings.simplefilter("ignore")
        if args.command == "report":
            print(write_report(args.run_dir))
            return 0
        out_dir = args.out_dir if args.resume else os.path.join(args.out_dir, f"{cfg.dataset}_{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir = broadcast_from_main(out_dir)  # the clocks of the ranks may be a second apart
        run_sweep(cfg, out_dir, resume=args.resume, jobs=args.jobs)
        if ranks.is_main:
            print(write_report(out_dir))
            print(f"\nresults, plots and report in {out_dir}/ (report.md, report.html)")
        return 0
    except OptionError as err:
        parser.error(f"argument {_flag(err.option, args)}: {' '.join(err.detail.split())}")
    except (ValueError, FileNotFoundError, ImportError, OSError, MemoryError, _OOM) as err:
        # RunFileError, a missing data file or extra, a full disk, a worker killed for memory
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (MemoryError, _OOM)):
            message = f"out of memory ({message}); lower --width, --batch_size or --T"
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename:
            message = f"{err.filename}: {err.strerror or message}"
        parser.error(message)
    except KeyboardInterrupt:
        if is_main:
            hint = f"; finish it with: {_resume_hint(argv, out_dir)}" if out_dir else ""
            print(f"stablespike: interrupted{hint}", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
