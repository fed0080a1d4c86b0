"""Side-by-side timing shared by the benchmarks: interleaved, alternating order, after a warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Tuple


def _samples(variants: Dict[str, Callable[[], None]], warmup: int, reps: int) -> Dict[str, List[float]]:
    """Seconds of every call, ``reps`` per variant. Every repetition runs all variants, in a
    rotated order, so that machine noise and position effects fall on all of them alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    order = list(variants.items())
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for rep in range(reps):
        shift = rep % len(order)
        for name, fn in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def time_interleaved(variants: Dict[str, Callable[[], None]], warmup: int, reps: int) -> Dict[str, float]:
    """Median seconds per call of each variant (see :func:`_samples`)."""
    return {name: statistics.median(v) for name, v in _samples(variants, warmup, reps).items()}


def time_paired(variants: Dict[str, Callable[[], None]], baseline: str, warmup: int, reps: int
                ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median seconds per call, and the median over repetitions of each variant's time over the
    baseline's time *in the same repetition*: a paired ratio, which slow drifts of a shared
    machine (the neighbours' load) do not bias the way they bias a ratio of two medians."""
    times = _samples(variants, warmup, reps)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: statistics.median(t / b for t, b in zip(v, times[baseline])) for name, v in times.items()}
    return medians, ratios
