"""Streaming statistics with bounded memory: update / compute / reset / merge (torchmetrics style).

Each accumulator keeps sums, never running means, in float64, with O(neurons) state whatever the
number of updates; ``merge`` combines two accumulators (two halves of the data, or two ranks), and
``state()`` lists the tensors to all-reduce in a distributed run.

Layouts: ``multistep=True`` means the tensor is ``(T, B, ...)``, else ``(B, ...)``. Leading time
and batch dimensions are averaged over, never summed into a rate (DESIGN.md rule 4).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ._checks import describe


def _lead(x: torch.Tensor, multistep: bool, name: str) -> int:
    """Number of leading (time, batch) dimensions of ``x``: 2 for multi-step, 1 for single-step."""
    lead = 2 if multistep else 1
    if not isinstance(x, torch.Tensor) or x.dim() < lead:
        layout = "(T, B, ...)" if multistep else "(B, ...)"
        raise ValueError(f"{name}: expected a tensor {layout}, got {describe(x)}")
    return lead


class FiringRate:
    """Per-neuron firing rate: spike count / (time steps x samples).

    ``update(spikes, multistep)``; ``compute()`` -> rates of the neuron shape (e.g. ``(N,)`` or
    ``(C, H, W)``); ``mean()`` -> the layer's mean rate.

    On the hot path (a hook call per layer and time step) an update is one in-place addition of
    the spikes into a buffer of one step's shape ``(B, *neurons)``; the buffer is reduced over the
    batch into the float64 per-neuron sum when the shape changes, every ``2**20`` updates (float32
    stays exact for binary spikes), and before any read. State: O(batch x neurons), constant in time.
    """

    _FLUSH_EVERY = 2 ** 20

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.spike_sum: Optional[torch.Tensor] = None  # neuron shape, float64
        self.count = 0  # time steps x samples seen
        self._buffer: Optional[torch.Tensor] = None  # (B, *neurons), spikes not yet reduced
        self._buffered = 0

    def update(self, spikes: torch.Tensor, multistep: bool = False) -> None:
        lead = _lead(spikes, multistep, "spikes")
        step = spikes.detach()
        if lead == 2:
            step = step.sum(dim=0)  # (B, *neurons): one reduction per multi-step call
        if self._buffer is not None and self._buffer.shape == step.shape and self._buffered < self._FLUSH_EVERY:
            self._buffer.add_(step)
        else:
            self._flush()
            self._buffer = step.clone()
        self._buffered += 1
        self.count += spikes.shape[0] * spikes.shape[1] if lead == 2 else spikes.shape[0]

    def _flush(self) -> None:
        if self._buffer is None:
            return
        total = self._buffer.sum(dim=0).to(torch.float64)
        self._buffer, self._buffered = None, 0
        if self.spike_sum is None:
            self.spike_sum = total
        else:
            self._check_shape(total)
            self.spike_sum.add_(total)

    def _check_shape(self, total: torch.Tensor) -> None:
        if total.shape != self.spike_sum.shape:
            raise ValueError(
                f"spikes: expected neurons of shape {tuple(self.spike_sum.shape)} as in earlier "
                f"updates, got {tuple(total.shape)}")

    def compute(self) -> torch.Tensor:
        self._flush()
        if self.spike_sum is None:
            raise RuntimeError("FiringRate.compute: no spikes were recorded (call update first)")
        return self.spike_sum / self.count

    def mean(self) -> float:
        return float(self.compute().mean())

    def merge(self, other: "FiringRate") -> "FiringRate":
        """Add ``other``'s counts into this accumulator (in place); returns self."""
        self._flush()
        other._flush()
        if other.spike_sum is not None:
            if self.spike_sum is None:
                self.spike_sum = other.spike_sum.clone()
            else:
                self._check_shape(other.spike_sum)
                self.spike_sum.add_(other.spike_sum)
            self.count += other.count
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        self._flush()
        return {"spike_sum": self.spike_sum, "count": torch.tensor(float(self.count))}


class MembraneStats:
    """Per-neuron membrane mean / std / min / max over time steps and samples.

    Keeps ``(n, mean, M2)`` and merges batches with Chan's parallel formula, so the variance is
    exact and stable however many updates arrive.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean_: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self.min_: Optional[torch.Tensor] = None
        self.max_: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, membrane: torch.Tensor, multistep: bool = False) -> None:
        lead = _lead(membrane, multistep, "membrane")
        v = membrane.detach().to(torch.float64).flatten(0, lead - 1)  # (samples, *neurons)
        var, mean = torch.var_mean(v, dim=0, unbiased=False)
        self._combine(v.shape[0], mean, var * v.shape[0], v.amin(dim=0), v.amax(dim=0))

    def _combine(self, n_b, mean_b, m2_b, min_b, max_b) -> None:
        if self.mean_ is None:
            self.n, self.mean_, self.m2, self.min_, self.max_ = n_b, mean_b, m2_b, min_b, max_b
            return
        if mean_b.shape != self.mean_.shape:
            raise ValueError(f"membrane: expected neurons of shape {tuple(self.mean_.shape)}, "
                             f"got {tuple(mean_b.shape)}")
        n = self.n + n_b
        delta = mean_b - self.mean_
        self.mean_ = self.mean_ + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / n)
        self.min_, self.max_ = torch.minimum(self.min_, min_b), torch.maximum(self.max_, max_b)
        self.n = n

    def compute(self) -> Dict[str, torch.Tensor]:
        """Per-neuron ``mean``, ``std`` (population), ``min``, ``max``."""
        if self.mean_ is None:
            raise RuntimeError("MembraneStats.compute: no membrane was recorded (call update first)")
        return {"mean": self.mean_, "std": (self.m2 / self.n).sqrt(), "min": self.min_, "max": self.max_}

    def merge(self, other: "MembraneStats") -> "MembraneStats":
        if other.mean_ is not None:
            self._combine(other.n, other.mean_, other.m2, other.min_, other.max_)
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        return {"n": torch.tensor(float(self.n)), "mean": self.mean_, "m2": self.m2,
                "min": self.min_, "max": self.max_}


class GradNorm:
    """Norms of the gradients that reach a layer: mean and max over the calls seen."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.norm_sum = torch.zeros((), dtype=torch.float64)
        self.norm_max = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        if not isinstance(grad, torch.Tensor):
            raise ValueError(f"grad: expected a tensor, got {describe(grad)}")
        norm = torch.linalg.vector_norm(grad.detach().to(torch.float64))
        self.norm_sum = self.norm_sum.to(norm.device) + norm
        self.norm_max = torch.maximum(self.norm_max.to(norm.device), norm)
        self.count += 1

    def compute(self) -> Dict[str, float]:
        if self.count == 0:
            raise RuntimeError("GradNorm.compute: no gradient was recorded (call update first)")
        return {"mean": float(self.norm_sum) / self.count, "max": float(self.norm_max),
                "count": self.count}

    def merge(self, other: "GradNorm") -> "GradNorm":
        self.norm_sum = self.norm_sum + other.norm_sum.to(self.norm_sum.device)
        self.norm_max = torch.maximum(self.norm_max, other.norm_max.to(self.norm_max.device))
        self.count += other.count
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        return {"count": torch.tensor(float(self.count)), "norm_sum": self.norm_sum,
                "norm_max": self.norm_max}
