"""Streaming statistics with bounded memory: update / compute / reset / merge (torchmetrics style).

Each accumulator declares its state up front with :meth:`Statistic.add_state` (a name, a default
and the reduction that combines two shares of the data: ``sum``, ``max``, ``min`` or ``cat``),
keeps sums, never running means, in float64, with O(neurons) state whatever the number of
updates. ``merge`` combines two accumulators (two halves of the data); ``sync(reduce)`` combines
the ranks of a distributed run state by state through collectives (all-reduce; an all-gather for
``cat``), with no pickling (:func:`stablespike.distributed.merge_across_ranks`).

Layouts: ``multistep=True`` means the tensor is ``(T, B, ...)``, else ``(B, ...)``. Leading time
and batch dimensions are averaged over, never summed into a rate (DESIGN.md rule 4).

Accumulation is in float32 (exact for counts up to 2**24) or float64 whatever the input's dtype:
``bool``, integer, ``float16`` and ``bfloat16`` spikes count exactly. The dtype is checked once per
accumulator (and again only if it changes), never per element.

Non-finite values (NaN / inf) in spikes, membranes or gradients are tracked without a device sync:
``first_nonfinite`` is the index of the first time step (gradients: the first recorded norm) that
carried one, ``inf`` when none did. The profiler turns it into a CRITICAL finding.

Gradient norms (one definition per quantity, see :class:`GradNorm` and
:func:`parameter_gradient_norm`):

* **layer gradient norm** -- for one spiking layer and one backward pass, the 2-norm of the
  gradient of the loss with respect to the layer's input current over all time steps and samples
  of the pass, ``sqrt(sum_t |dL/dI_t|^2)`` (after the surrogate derivative). The profiler and
  :class:`~stablespike.streaming.GradNormMonitor` record this; the per-layer rules (explosion
  across passes, vanishing across depth) read it.
* **parameter gradient norm** -- the 2-norm of all parameter gradients of the model, as
  ``torch.nn.utils.clip_grad_norm_`` computes it. :class:`~stablespike.stability.StabilityMonitor`
  records this; the trend rule (exploding / vanishing over training) reads it.
"""
from __future__ import annotations

import collections
import copy
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ._checks import describe

REDUCTIONS = ("sum", "max", "min", "cat")
Reduce = Callable[[torch.Tensor, str], torch.Tensor]
_MAX_DIMS = 8  # neuron shapes exchanged between ranks: (C, H, W) and the like


def _lead(x: torch.Tensor, multistep: bool, name: str) -> int:
    """Number of leading (time, batch) dimensions of ``x``: 2 for multi-step, 1 for single-step."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    lead = 2 if multistep else 1
    if x.dim() < lead:
        layout = "(T, B, ...)" if multistep else "(B, ...)"
        raise ValueError(f"{name}: expected a tensor {layout}, got {describe(x)}")
    return lead


def _accumulator_dtype(x: torch.Tensor, name: str) -> torch.dtype:
    """float64 for float64 input, else float32; refuses complex and other kinds (checked once)."""
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        return torch.float32  # bool and integer counts: exact in float32 up to 2**24 per flush
    if x.is_complex():
        raise TypeError(f"{name}: expected bool, integer or floating values, got {describe(x)}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _first_bad(finite: torch.Tensor, start: int) -> torch.Tensor:
    """``start`` + index of the first False in the 1-D ``finite`` (float64 0-dim), inf if none;
    computed on the device, without a sync."""
    bad = ~finite
    first = bad.to(torch.int8).argmax().to(torch.float64) + start
    return torch.where(bad.any(), first, torch.full_like(first, math.inf))


class _FiniteTrace:
    """Where the first NaN / inf appeared, at the cost of one small reduction per step: each
    step's sum is written in place into a preallocated ``(1024,)`` buffer (NaN and inf survive
    a sum); a full buffer, or a read, folds it on the device into the first bad step index."""

    SIZE = 1024

    def __init__(self):
        self.buf: Optional[torch.Tensor] = None
        self.k = self.start = 0
        self.first: Optional[torch.Tensor] = None  # float64 0-dim, inf while none was bad

    def add(self, x: torch.Tensor, step: int) -> None:
        """Record the sum of ``x`` as time step ``step``."""
        if self.buf is None or self.buf.device != x.device or self.k == self.SIZE:
            self.fold()
            if self.buf is None or self.buf.device != x.device:
                self.buf = torch.empty(self.SIZE, dtype=torch.float32, device=x.device)
        if self.k == 0:
            self.start = step
        torch.sum(x.reshape(1, -1), 1, dtype=torch.float32, out=self.buf[self.k:self.k + 1])
        self.k += 1

    def add_first(self, first: torch.Tensor) -> None:
        """Record an already located first bad step (a float64 0-dim tensor, inf if none)."""
        self.first = first if self.first is None else torch.minimum(self.first, first.to(self.first.device))

    def fold(self) -> None:
        if self.k:
            self.add_first(_first_bad(torch.isfinite(self.buf[: self.k]), self.start))
            self.k = 0

    def result(self) -> float:
        """The first bad step seen so far (a device sync), inf if none; the trace restarts."""
        self.fold()
        first, self.first = self.first, None
        return math.inf if first is None else float(first)


class Statistic:
    """Base of the accumulators: declared states, ``reset``, ``merge``, ``state`` and ``sync``.

    Subclasses declare each state once with :meth:`add_state` in ``__init__`` and write
    ``update`` and ``compute``; pending (not yet folded) data is folded by ``_flush``, which runs
    before any read. A state whose default is None takes its shape from the first update.
    """

    def __init__(self):
        self._reductions: Dict[str, str] = {}
        self._defaults: Dict[str, Any] = {}

    def add_state(self, name: str, default: Any, reduce: str) -> None:
        """Declare the state ``name`` (a tensor, a number, or None until the first update) and
        how two shares of it combine: ``sum``, ``max``, ``min`` or ``cat`` (concatenate)."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
        self._reductions[name], self._defaults[name] = reduce, default
        setattr(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))
        self._reset_pending()

    def _reset_pending(self) -> None:
        """Forget the data not yet folded into the states (subclasses with buffers)."""

    def _flush(self) -> None:
        """Fold pending data into the declared states (subclasses with buffers)."""

    def state(self) -> Dict[str, Any]:
        """The declared states, folded: what ``merge`` and ``sync`` combine."""
        self._flush()
        return {name: getattr(self, name) for name in self._reductions}

    def merge(self, other: "Statistic") -> "Statistic":
        """Add ``other``'s share of the data into this accumulator (in place); returns self."""
        if type(other) is not type(self):
            raise TypeError(f"other: expected a {type(self).__name__}, got {type(other).__name__}")
        self._flush()
        for name, value in other.state().items():
            setattr(self, name, _combine(getattr(self, name), value, self._reductions[name], name))
        return self

    def sync(self, reduce: Reduce) -> "Statistic":
        """Replace every state by its reduction over all ranks; ``reduce(tensor, kind)`` is the
        collective (every rank calls ``sync`` in the same order). Lazily shaped states are given
        the shape the other ranks agree on first."""
        self._flush()
        for name, kind in self._reductions.items():
            setattr(self, name, _reduce_state(getattr(self, name), kind, reduce, name))
        return self


def _combine(mine, theirs, kind: str, name: str):
    if theirs is None:
        return mine
    if mine is None:
        return copy.deepcopy(theirs)
    if isinstance(mine, torch.Tensor) and mine.shape != theirs.shape and kind != "cat":
        raise ValueError(f"{name}: expected neurons of shape {tuple(mine.shape)} as in this "
                         f"accumulator, got {tuple(theirs.shape)}")
    if kind == "sum":
        return mine + theirs
    if kind == "max":
        return torch.maximum(mine, theirs) if isinstance(mine, torch.Tensor) else max(mine, theirs)
    if kind == "min":
        return torch.minimum(mine, theirs) if isinstance(mine, torch.Tensor) else min(mine, theirs)
    if isinstance(mine, collections.deque):
        out = collections.deque(mine, maxlen=mine.maxlen)
        out.extend(theirs)
        return out
    return torch.cat([mine, theirs])


def _agree_shape(value: Optional[torch.Tensor], reduce: Reduce, name: str):
    """The shape of a lazily shaped state over all ranks (None if no rank has one)."""
    code = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64)
    if value is not None:
        if value.dim() > _MAX_DIMS:
            raise ValueError(f"{name}: at most {_MAX_DIMS} neuron dimensions, got {tuple(value.shape)}")
        code[0] = value.dim()
        code[1:1 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
    agreed = reduce(code, "max")
    low = reduce(torch.where(code >= 0, code, torch.iinfo(torch.int64).max), "min")
    if int(agreed[0]) < 0:
        return None
    shape = tuple(int(d) for d in agreed[1:1 + int(agreed[0])])
    if value is not None and not torch.equal(agreed[: 1 + value.dim()], low[: 1 + value.dim()]):
        raise ValueError(f"{name}: the ranks recorded neurons of different shapes (one has "
                         f"{tuple(value.shape)}, another {shape})")
    return shape


def _reduce_state(value, kind: str, reduce: Reduce, name: str):
    if isinstance(value, collections.deque):  # a window of recent numbers: gathered, in rank order
        joined = reduce(torch.tensor(list(value), dtype=torch.float64), "cat")
        return collections.deque(joined.tolist(), maxlen=value.maxlen)
    if value is None or isinstance(value, torch.Tensor):
        shape = _agree_shape(value, reduce, name)
        if shape is None:
            return None
        if value is None:  # this rank saw nothing: the neutral element of the reduction
            fill = {"sum": 0.0, "max": -math.inf, "min": math.inf}[kind]
            value = torch.full(shape, fill, dtype=torch.float64)
        return reduce(value, kind)
    out = float(reduce(torch.tensor(float(value), dtype=torch.float64), kind))
    return int(out) if isinstance(value, int) else out


class FiringRate(Statistic):
    """Per-neuron firing rate: spike count / (time steps x samples).

    ``update(spikes, multistep)``; ``compute()`` -> rates of the neuron shape (e.g. ``(N,)`` or
    ``(C, H, W)``); ``mean()`` -> the layer's mean rate. Spikes may be bool, integer or floating
    (any precision): they are summed in float32 / float64.

    On the hot path (a hook call per layer and time step) an update is one in-place addition of
    the spikes into a float32 buffer of one step's shape ``(B, *neurons)``; the buffer is reduced
    over the batch into the float64 per-neuron sum when the shape changes, every ``2**20``
    updates (float32 stays exact for binary spikes), and before any read. State: O(batch x
    neurons), constant in time. Floating spikes also cost one sum per update, for the NaN check.
    """

    _FLUSH_EVERY = 2 ** 20

    def __init__(self):
        super().__init__()
        self.add_state("spike_sum", None, "sum")  # neuron shape, float64
        self.add_state("count", 0, "sum")  # time steps x samples seen
        self.add_state("first_nonfinite", math.inf, "min")  # first time step with NaN / inf spikes
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._buffer: Optional[torch.Tensor] = None  # (B, *neurons), spikes not yet reduced
        self._buffered = 0
        self._dtype: Optional[torch.dtype] = None  # the spikes' dtype, checked when it changes
        self._acc = torch.float32
        self._trace = _FiniteTrace()  # where NaN / inf spikes first appeared
        self.steps = 0  # time steps seen (for naming the step of a NaN)

    def _check_dtype(self, step: torch.Tensor) -> None:
        if step.dtype is not self._dtype:
            self._acc, self._dtype = _accumulator_dtype(step, "spikes"), step.dtype

    def update(self, spikes: torch.Tensor, multistep: bool = False) -> None:
        lead = _lead(spikes, multistep, "spikes")
        step = spikes.detach()
        self._check_dtype(step)
        floating = step.is_floating_point()
        if lead == 2:  # (T, B, ...) at once: one reduction straight into the totals
            total = step.sum(dim=(0, 1), dtype=self._acc)
            if floating:
                per_step = step.reshape(step.shape[0], -1).sum(1, dtype=self._acc)
                self._trace.add_first(_first_bad(torch.isfinite(per_step), self.steps))
            self._add_total(total)
            self.count += step.shape[0] * step.shape[1]
            self.steps += step.shape[0]
            return
        if floating:
            self._trace.add(step, self.steps)
        if (self._buffer is not None and self._buffer.shape == step.shape
                and self._buffered < self._FLUSH_EVERY and self._buffer.dtype == self._acc):
            self._buffer.add_(step)
        else:
            known = self._buffer.shape[1:] if self._buffer is not None else (
                self.spike_sum.shape if self.spike_sum is not None else None)
            if known is not None and step.shape[1:] != known:
                raise ValueError(f"spikes: expected neurons of shape {tuple(known)} as in earlier "
                                 f"updates, got {tuple(step.shape[1:])}")
            self._flush()
            self._buffer = step.to(self._acc, copy=True)
        self._buffered += 1
        self.count += step.shape[0]
        self.steps += 1

    def _flush(self) -> None:
        self.first_nonfinite = min(self.first_nonfinite, self._trace.result())
        if self._buffer is None:
            return
        total = self._buffer.sum(dim=0)
        self._buffer, self._buffered = None, 0
        self._add_total(total)

    def _add_total(self, total: torch.Tensor) -> None:
        if self.spike_sum is None:
            self.spike_sum = total.to(torch.float64)
        else:
            if total.shape != self.spike_sum.shape:
                raise ValueError(
                    f"spikes: expected neurons of shape {tuple(self.spike_sum.shape)} as in earlier "
                    f"updates, got {tuple(total.shape)}")
            self.spike_sum.add_(total)

    def compute(self) -> torch.Tensor:
        self._flush()
        if self.spike_sum is None:
            raise RuntimeError("FiringRate.compute: no spikes were recorded (call update first)")
        return self.spike_sum / self.count

    def mean(self) -> float:
        return float(self.compute().mean())

    def has_data(self) -> bool:
        return self.count > 0


class MembraneStats(Statistic):
    """Per-neuron membrane mean / std / min / max over time steps and samples.

    Hot path: each update subtracts a per-neuron shift (the batch mean of the first step seen)
    into a preallocated scratch tensor and adds the batch sums of the deviations and of their
    squares into a ``(2, neurons)`` float32 accumulator with two matrix-vector products (a row of
    ones times the deviations): four in-place operations, and no per-step buffer of the batch's
    size to keep in cache. Min / max, when tracked, are kept per row, in place. The accumulator
    is folded into float64 ``(n, mean, M2)`` with Chan's parallel formula every ``256`` updates,
    on a shape change and before any read. The shift keeps the sums small, so a membrane that is
    the same everywhere gives a std of exactly 0 (voltage collapse stays detectable). NaN / inf
    membranes are detected from the ``(neurons,)`` sums: one small reduction per update.

    ``sync`` combines ranks with Chan's formula in two all-reduces (the global mean first, then
    each rank's M2 about it), so no rank's moments are pickled and no precision is lost.
    """

    _FLUSH_EVERY = 256

    def __init__(self, extremes: bool = True):
        super().__init__()
        self.extremes = extremes  # track min / max (two more in-place operations per update)
        self.add_state("n", 0, "sum")
        self.add_state("mean_", None, "sum")  # neuron shape, float64 (combined by Chan's formula)
        self.add_state("m2", None, "sum")
        self.add_state("min_", None, "min")
        self.add_state("max_", None, "max")
        self.add_state("first_nonfinite", math.inf, "min")
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._buf: Optional[_MembraneBuffer] = None
        self._trace = _FiniteTrace()
        self.steps = 0

    def update(self, membrane: torch.Tensor, multistep: bool = False) -> None:
        lead = _lead(membrane, multistep, "membrane")
        v = membrane.detach()
        if v.is_complex():
            raise TypeError(f"membrane: expected real values, got {describe(v)}")
        if not v.is_floating_point():  # integer or bool membranes (rare): averaged in float32
            v = v.float()
        if lead == 2:
            self._update_steps(v)
            return
        buf = self._buf
        if buf is None or buf.step_shape != v.shape or buf.updates >= self._FLUSH_EVERY:
            self._flush()
            buf = self._buf = _MembraneBuffer(v, self.extremes)
        buf.add(v, self.extremes)
        self._trace.add(buf.sums[0], self.steps)  # (neurons,): NaN / inf stay in the running sums
        self.steps += 1

    def _update_steps(self, v: torch.Tensor) -> None:
        """``(T, B, *neurons)`` at once: sums of deviations from the first step (shifted, so a
        constant membrane gives a variance of exactly 0), then pooled per neuron in float64."""
        T, shift = v.shape[0], v[0]
        d = v - shift
        s1, s2 = d.sum(0).double(), (d * d).sum(0).double()  # (B, *neurons)
        self._trace.add_first(_first_bad(torch.isfinite(v.reshape(T, -1).sum(1, dtype=torch.float64)), self.steps))
        self.steps += T
        mean_rows = shift.double() + s1 / T
        m2_rows = (s2 - s1 * s1 / T).clamp_min(0)
        mean_b = mean_rows.mean(0)
        m2_b = m2_rows.sum(0) + T * ((mean_rows - mean_b) ** 2).sum(0)
        lo, hi = (v.amin(dim=(0, 1)).double(), v.amax(dim=(0, 1)).double()) if self.extremes else (mean_b, mean_b)
        if self._buf is not None and self._buf.step_shape[1:] != mean_b.shape:
            self._flush()
        self._combine(T * v.shape[1], mean_b, m2_b, lo, hi)

    def _flush(self) -> None:
        self.first_nonfinite = min(self.first_nonfinite, self._trace.result())
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
        if not isinstance(other, MembraneStats):
            raise TypeError(f"other: expected a MembraneStats, got {type(other).__name__}")
        self._flush()
        other._flush()
        if other.mean_ is not None:
            self._combine(other.n, other.mean_, other.m2, other.min_, other.max_)
        self.first_nonfinite = min(self.first_nonfinite, other.first_nonfinite)
        return self

    def sync(self, reduce: Reduce) -> "MembraneStats":
        """Chan's formula over ranks with all-reduces: n and n x mean summed give the global
        mean; each rank's M2 about that mean, summed, gives the global M2."""
        self._flush()
        shape = _agree_shape(self.mean_, reduce, "membrane")
        self.first_nonfinite = float(reduce(torch.tensor(self.first_nonfinite, dtype=torch.float64), "min"))
        if shape is None:
            return self
        if self.mean_ is None:  # this rank saw nothing: contributes zeros
            zeros = torch.zeros(shape, dtype=torch.float64)
            self.mean_, self.m2 = zeros, zeros.clone()
            self.min_, self.max_ = torch.full(shape, math.inf, dtype=torch.float64), torch.full(shape, -math.inf, dtype=torch.float64)
        n = float(reduce(torch.tensor(float(self.n), dtype=torch.float64), "sum"))
        mean = reduce(self.mean_ * self.n, "sum") / n
        self.m2 = reduce(self.m2 + self.n * (self.mean_ - mean) ** 2, "sum")
        self.mean_, self.n = mean, int(n)
        self.min_, self.max_ = reduce(self.min_, "min"), reduce(self.max_, "max")
        return self

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



class GradNorm(Statistic):
    """Gradient norms of one layer, one per call of :meth:`update` / :meth:`add_norm` (for the
    monitors and the profiler: one per backward pass, the *layer gradient norm* of the module
    docstring): mean and max over all calls, and the most recent ``window`` norms (for
    median-based rules). Non-finite norms are counted apart (``nonfinite``, and
    ``first_nonfinite``: the index of the first such call) and left out of mean, max and window.

    Hot path: one norm per call, kept as a 0-dim tensor (no device sync); folded into float64
    totals every ``256`` calls and before any read.
    """

    _FLUSH_EVERY = 256

    def __init__(self, window: int = 1024):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive integer, got {window!r}")
        self.window = window
        self.add_state("count", 0, "sum")  # finite norms
        self.add_state("norm_sum", 0.0, "sum")
        self.add_state("norm_max", 0.0, "max")
        self.add_state("nonfinite", 0, "sum")
        self.add_state("first_nonfinite", math.inf, "min")
        self.add_state("recent", collections.deque(maxlen=self.window), "cat")
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._pending: List[torch.Tensor] = []

    def update(self, grad: torch.Tensor) -> None:
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"grad: expected a torch.Tensor, got {describe(grad)}")
        g = grad.detach()
        if not g.is_floating_point():
            raise TypeError(f"grad: expected floating-point values, got {describe(grad)}")
        self.add_norm(torch.linalg.vector_norm(g, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32))

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
        for norm in norms:
            if not math.isfinite(norm):
                self.first_nonfinite = min(self.first_nonfinite, float(self.count + self.nonfinite))
                self.nonfinite += 1
                continue
            self.count += 1
            self.norm_sum += norm
            self.norm_max = max(self.norm_max, norm)
            self.recent.append(norm)

    def has_data(self) -> bool:
        return self.count + self.nonfinite > 0 or bool(self._pending)

    def compute(self) -> Dict[str, float]:
        """``mean`` and ``max`` of the finite norms (NaN when none was finite), ``count`` of
        them, and ``nonfinite``, the number of NaN / inf norms."""
        self._flush()
        if self.count + self.nonfinite == 0:
            raise RuntimeError("GradNorm.compute: no gradient was recorded (call update first)")
        mean = self.norm_sum / self.count if self.count else math.nan
        return {"mean": mean, "max": self.norm_max if self.count else math.nan, "count": self.count,
                "nonfinite": self.nonfinite}


def parameter_gradient_norm(model: nn.Module) -> float:
    """The *parameter gradient norm*: the 2-norm of all parameter gradients of ``model`` taken
    together (as ``torch.nn.utils.clip_grad_norm_`` computes it), in float64; 0.0 when there
    are none. NaN or inf when a gradient is not finite."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {describe(model)}")
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([n.cpu() for n in norms]))) if norms else 0.0
