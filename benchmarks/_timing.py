"""Side-by-side timing shared by the benchmarks: interleaved, alternating order, after a warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def time_interleaved(variants: Dict[str, Callable[[], None]], warmup: int, reps: int) -> Dict[str, float]:
    """Median seconds per call of each variant. Every repetition runs all variants, in a rotated
    order, so that machine noise and position effects fall on all of them alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    order = list(variants.items())
    times = {name: [] for name in variants}
    for rep in range(reps):
        shift = rep % len(order)
        for name, fn in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}
