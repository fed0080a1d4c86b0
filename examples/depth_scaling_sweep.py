"""The depth-scaling sweep from Python: deeper spiking MLPs, with and without the Lyapunov
penalty, as they are and cured (calibrated initialization + a wide surrogate), then the report.

    python examples/depth_scaling_sweep.py                  # digits, depths 2/6/10, 2 seeds: a few min
    python examples/depth_scaling_sweep.py --out_dir runs/x # a killed run: the same command resumes it
    python examples/depth_scaling_sweep.py --fast           # two tiny depths, 1 epoch (the test suite)

The command line does the same: ``stablespike bench depth-scaling --inits default calibrated
--surrogate_slope 1 ...`` and ``stablespike report DIR``. Each finished run is written to
``DIR/runs/`` at once, so running the script again after an interruption (``resume=True``) picks
up where it stopped; ``report.md`` / ``report.html`` and the plots are rendered from the run files.
"""
from __future__ import annotations

import argparse

from stablespike.bench import SweepConfig, run_sweep
from stablespike.bench.report import write_report
from stablespike.train import TrainConfig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="runs/depth_scaling_example")
    parser.add_argument("--fast", action="store_true", help="depths 1 and 2, 1 epoch, 200 samples")
    args = parser.parse_args(argv)

    train = TrainConfig(epochs=1 if args.fast else 4, T=4 if args.fast else 8, batch_size=64,
                        lyap_eps=1e-2, progress=False)
    cfg = SweepConfig(
        dataset="digits", model="mlp",
        depths=[1, 2] if args.fast else [2, 6, 10],
        seeds=[0] if args.fast else [0, 1],
        width=32 if args.fast else 128,
        inits=["default", "calibrated"],  # vanilla, lyapunov, calibrated, calibrated+lyapunov
        surrogate_slope=1.0,  # the wide surrogate for every variant (the seeds' slope is 25)
        train_subset=200 if args.fast else None, test_subset=100 if args.fast else None,
        train=train)
    run_sweep(cfg, args.out_dir, resume=True)  # skips finished runs, continues a killed one
    print(write_report(args.out_dir))  # the table, observations, what to do, failing runs
    print(f"\nreport: {args.out_dir}/report.html")


if __name__ == "__main__":
    main()
