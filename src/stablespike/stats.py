"""Streaming statistics with bounded memory: update / compute / reset / merge (torchmetrics style).

Each accumulator keeps sums, never running means, in float64, with O(neurons) state whatever the
number of updates; ``merge`` combines two accumulators (two halves of the data, or two ranks), and
``state()`` lists the tensors to all-reduce in a distributed run.

Layouts: ``multistep=True`` means the tensor is ``(T, B, ...)``, else ``(B, ...)``. Leading time
and batch dimensions are averaged over, never summed into a rate (DESIGN.md rule 4).
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional

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
        if lead == 2:  # (T, B, ...) at once: one reduction straight into the totals
            self._add_total(step.sum(dim=(0, 1)))
            self.count += step.shape[0] * step.shape[1]
            return
        if self._buffer is not None and self._buffer.shape == step.shape and self._buffered < self._FLUSH_EVERY:
            self._buffer.add_(step)
        else:
            known = self._buffer.shape[1:] if self._buffer is not None else (
                self.spike_sum.shape if self.spike_sum is not None else None)
            if known is not None and step.shape[1:] != known:
                raise ValueError(f"spikes: expected neurons of shape {tuple(known)} as in earlier "
                                 f"updates, got {tuple(step.shape[1:])}")
            self._flush()
            self._buffer = step.clone()
        self._buffered += 1
        self.count += spikes.shape[0]

    def _flush(self) -> None:
        if self._buffer is None:
            return
        total = self._buffer.sum(dim=0)
        self._buffer, self._buffered = None, 0
        self._add_total(total)

    def _add_total(self, total: torch.Tensor) -> None:
        if self.spike_sum is None:
            self.spike_sum = total.to(torch.float64)
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

    def has_data(self) -> bool:
        return self.count > 0

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

    Hot path: each update subtracts a per-neuron shift (the batch mean of the first step seen)
    into a preallocated scratch tensor and adds the batch sums of the deviations and of their
    squares into a ``(2, neurons)`` float32 accumulator with two matrix-vector products (a row of
    ones times the deviations): four in-place operations, and no per-step buffer of the batch's
    size to keep in cache. Min / max, when tracked, are kept per row, in place. The accumulator
    is folded into float64 ``(n, mean, M2)`` with Chan's parallel formula every ``256`` updates,
    on a shape change and before any read. The shift keeps the sums small, so a membrane that is
    the same everywhere gives a std of exactly 0 (voltage collapse stays detectable).
    """

    _FLUSH_EVERY = 256

    def __init__(self, extremes: bool = True):
        self.extremes = extremes  # track min / max (two more in-place operations per update)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean_: Optional[torch.Tensor] = None  # neuron shape, float64
        self.m2: Optional[torch.Tensor] = None
        self.min_: Optional[torch.Tensor] = None
        self.max_: Optional[torch.Tensor] = None
        self._buf: Optional[_MembraneBuffer] = None

    def update(self, membrane: torch.Tensor, multistep: bool = False) -> None:
        lead = _lead(membrane, multistep, "membrane")
        v = membrane.detach()
        if lead == 2:
            self._update_steps(v)
            return
        buf = self._buf
        if buf is None or buf.step_shape != v.shape or buf.updates >= self._FLUSH_EVERY:
            self._flush()
            buf = self._buf = _MembraneBuffer(v, self.extremes)
        buf.add(v, self.extremes)

    def _update_steps(self, v: torch.Tensor) -> None:
        """``(T, B, *neurons)`` at once: sums of deviations from the first step (shifted, so a
        constant membrane gives a variance of exactly 0), then pooled per neuron in float64."""
        T, shift = v.shape[0], v[0]
        d = v - shift
        s1, s2 = d.sum(0).double(), (d * d).sum(0).double()  # (B, *neurons)
        mean_rows = shift.double() + s1 / T
        m2_rows = (s2 - s1 * s1 / T).clamp_min(0)
        mean_b = mean_rows.mean(0)
        m2_b = m2_rows.sum(0) + T * ((mean_rows - mean_b) ** 2).sum(0)
        lo, hi = (v.amin(dim=(0, 1)).double(), v.amax(dim=(0, 1)).double()) if self.extremes else (mean_b, mean_b)
        if self._buf is not None and self._buf.step_shape[1:] != mean_b.shape:
            self._flush()
        self._combine(T * v.shape[1], mean_b, m2_b, lo, hi)

    def _flush(self) -> None:
        if self._buf is None:
            return
        buf, self._buf = self._buf, None
        self._combine(*buf.moments())

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

    def has_data(self) -> bool:
        return self.n > 0 or self._buf is not None

    def compute(self) -> Dict[str, torch.Tensor]:
        """Per-neuron ``mean``, ``std`` (population), and ``min``, ``max`` when tracked."""
        self._flush()
        if self.mean_ is None:
            raise RuntimeError("MembraneStats.compute: no membrane was recorded (call update first)")
        out = {"mean": self.mean_, "std": (self.m2.clamp_min(0) / self.n).sqrt()}
        if self.extremes:
            out.update(min=self.min_, max=self.max_)
        return out

    def merge(self, other: "MembraneStats") -> "MembraneStats":
        self._flush()
        other._flush()
        if other.mean_ is not None:
            self._combine(other.n, other.mean_, other.m2, other.min_, other.max_)
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        self._flush()
        return {"n": torch.tensor(float(self.n)), "mean": self.mean_, "m2": self.m2,
                "min": self.min_, "max": self.max_}


class _MembraneBuffer:
    """The float32 sums of up to 256 steps of one batch shape ``(B, *neurons)``; see MembraneStats."""

    def __init__(self, v: torch.Tensor, extremes: bool):
        self.step_shape, self.updates = v.shape, 0
        rows = v.reshape(v.shape[0], -1)
        acc = torch.promote_types(rows.dtype, torch.float32)  # never sum in half precision
        self.shift = rows.to(acc).mean(0, keepdim=True)  # (1, N)
        self.sums = rows.new_zeros(2, rows.shape[1], dtype=acc)  # deviations, squared deviations
        self.ones = rows.new_ones(1, rows.shape[0], dtype=acc)
        self.scratch = torch.empty(rows.shape, dtype=acc, device=rows.device)
        self.lo, self.hi = (rows.clone(), rows.clone()) if extremes else (None, None)

    def add(self, v: torch.Tensor, extremes: bool) -> None:
        rows = v.reshape(v.shape[0], -1)
        d = torch.sub(rows, self.shift, out=self.scratch)
        self.sums[0:1].addmm_(self.ones, d)  # batch sum as ones @ d: one BLAS call
        d.mul_(d)
        self.sums[1:2].addmm_(self.ones, d)
        if extremes:
            torch.minimum(self.lo, rows, out=self.lo)
            torch.maximum(self.hi, rows, out=self.hi)
        self.updates += 1

    def moments(self):
        """``(n, mean, M2, min, max)`` per neuron, float64, in the neuron shape."""
        shape = self.step_shape[1:]
        n = self.updates * self.step_shape[0]
        s1, s2 = self.sums[0].double(), self.sums[1].double()
        mean = self.shift[0].double() + s1 / n
        m2 = (s2 - s1 * s1 / n).clamp_min(0)
        if self.lo is None:
            lo = hi = mean
        else:
            lo, hi = self.lo.amin(0).double(), self.hi.amax(0).double()
        return n, mean.view(shape), m2.view(shape), lo.view(shape), hi.view(shape)


class GradNorm:
    """Norms of the gradients that reach a layer: mean and max over all calls, and the most recent
    ``window`` norms (for median-based rules).

    Hot path: one norm per call, kept as a 0-dim tensor (no device sync); folded into float64
    totals every ``256`` calls and before any read.
    """

    _FLUSH_EVERY = 256

    def __init__(self, window: int = 1024):
        self.window = int(window)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.norm_sum = 0.0
        self.norm_max = 0.0
        self.recent: "collections.deque[float]" = collections.deque(maxlen=self.window)
        self._pending: List[torch.Tensor] = []

    def update(self, grad: torch.Tensor) -> None:
        if not isinstance(grad, torch.Tensor):
            raise ValueError(f"grad: expected a tensor, got {describe(grad)}")
        self.add_norm(torch.linalg.vector_norm(grad.detach()))

    def add_norm(self, norm: torch.Tensor) -> None:
        """Record an already computed norm (a 0-dim tensor)."""
        self._pending.append(norm.detach())
        if len(self._pending) >= self._FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        norms = torch.stack([n.to(torch.float64) for n in self._pending]).cpu().tolist()
        self._pending = []
        self.count += len(norms)
        self.norm_sum += sum(norms)
        self.norm_max = max(self.norm_max, max(norms))
        self.recent.extend(norms)

    def has_data(self) -> bool:
        return self.count > 0 or bool(self._pending)

    def compute(self) -> Dict[str, float]:
        self._flush()
        if self.count == 0:
            raise RuntimeError("GradNorm.compute: no gradient was recorded (call update first)")
        return {"mean": self.norm_sum / self.count, "max": self.norm_max, "count": self.count}

    def merge(self, other: "GradNorm") -> "GradNorm":
        self._flush()
        other._flush()
        self.count += other.count
        self.norm_sum += other.norm_sum
        self.norm_max = max(self.norm_max, other.norm_max)
        self.recent.extend(other.recent)
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        self._flush()
        return {"count": torch.tensor(float(self.count)), "norm_sum": torch.tensor(self.norm_sum),
                "norm_max": torch.tensor(self.norm_max)}
