"""What the per-layer TensorBoard figures cost ``fit``: the same run (``out_dir`` given,
tensorboard installed) with ``TrainConfig(diagnostics=True)`` (the default: a profiler on the
training batches) and ``diagnostics=False``, interleaved, after a warm-up; medians of the paired
ratios.

    python benchmarks/fit_diagnostics_overhead.py [--reps 5] [--depth 4]
"""
import argparse
import statistics
import tempfile
import time

import torch

import stablespike.train as train
from stablespike import SpikingMLP
from stablespike.data import load_dataset


def one_run(data, depth: int, profiled: bool) -> float:
    torch.manual_seed(0)
    model = SpikingMLP(64, [128] * depth, 10)
    config = train.TrainConfig(epochs=1, batch_size=64, T=8, progress=False, diagnostics=profiled)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train.fit(model, data, config, out)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    data = load_dataset("digits")
    one_run(data, args.depth, True), one_run(data, args.depth, False)  # warm-up
    ratios, plain = [], []
    for rep in range(args.reps):
        order = (True, False) if rep % 2 == 0 else (False, True)
        times = {p: one_run(data, args.depth, p) for p in order}
        ratios.append(times[True] / times[False])
        plain.append(times[False])
    print(f"fit, 1 epoch of digits, SpikingMLP 64-128x{args.depth}-10, T=8, {torch.get_num_threads()} threads: "
          f"without {statistics.median(plain):.2f} s, with the per-layer figures "
          f"{statistics.median(ratios):.3f}x (median of {args.reps} paired ratios; all: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
