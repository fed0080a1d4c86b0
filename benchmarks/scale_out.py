"""Wall-clock of the same depth-scaling sweep run three ways on this machine, side by side:
one process (--jobs 1), independent runs in parallel (--jobs 2), and every run in DDP over two
ranks (torchrun --nproc_per_node 2, gloo). Interleaved, rotating order, medians.

    python benchmarks/scale_out.py --reps 3

On a 2-core machine the ceiling is 2x; DDP also pays an all-reduce of the gradients per step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _timing import time_interleaved  # noqa: E402

SWEEP = ["bench", "depth-scaling", "--dataset", "digits", "--depths", "2", "6", "--seeds", "0", "1",
         "--epochs", "2", "--batch_size", "64", "--T", "8", "--width", "128", "--no-progress"]


def command(kind: str, out: str):
    cores = os.cpu_count() or 1
    if kind == "torchrun x2":
        env = {"OMP_NUM_THREADS": str(max(1, cores // 2))}
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "stablespike", *SWEEP, "--out_dir", out], env
    jobs = kind.split()[-1]
    return [sys.executable, "-m", "stablespike", *SWEEP, "--jobs", jobs, "--out_dir", out], {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp()

    def runner(kind):
        def run():
            out = os.path.join(root, kind.replace(" ", "_"))
            shutil.rmtree(out, ignore_errors=True)
            cmd, env = command(kind, out)
            subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True)
        return run

    kinds = ["--jobs 1", "--jobs 2", "torchrun x2"]
    times = time_interleaved({k: runner(k) for k in kinds}, warmup=0, reps=args.reps)
    print(f"sweep: digits MLP width 128, depths 2 6 x 2 methods x seeds 0 1 (8 runs), 2 epochs, "
          f"{os.cpu_count()} cores, {args.reps} reps")
    for kind in kinds:
        print(f"{kind:<12} {times[kind]:7.1f} s   speed-up {times['--jobs 1'] / times[kind]:.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
