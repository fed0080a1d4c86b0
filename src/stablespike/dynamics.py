"""The one time loop: unroll a stepper over a time-first sequence, optionally with a perturbed twin.

A *stepper* is anything with

* ``init_state(batch_size, device, dtype) -> state`` — ``state`` is a tuple of tensors whose
  first dimension is the batch;
* ``step(x_t, state) -> (out_t, state)`` — one time step, ``x_t`` of shape ``(B, ...)``;

and optionally

* ``state_spec() -> tuple[StateSpec, ...]`` — what each state tensor is (layer, kind). Without it
  every tensor is a continuous state of its own layer. The Lyapunov estimators perturb and measure
  only continuous kinds (membrane, synaptic current), never spikes.
* ``supports_twins = True`` and ``step(x_t, state, twins=TwinLayout)`` — the stepper receives the
  nominal input ``x_t`` of batch ``B`` while its state has ``B + K`` rows (the ``K`` twin rows follow
  the nominal ones). It computes its first layer's input current once for ``B`` rows and copies it
  to the twins (the seeds' P=2 trick: the first layer's input is identical for both trajectories),
  and it makes twins share dropout masks and batch-norm statistics with their nominal rows.
  A stepper without it gets ``x_t`` repeated for the twin rows.
* ``supports_twin_differences = True`` (a property may decide) and the same ``step`` receiving a
  ``TwinLayout`` with ``differences=True``: the state is then the nominal state followed by one
  difference ``twin - partner`` of ``K`` rows per state tensor, and ``step`` returns the nominal
  output only (:mod:`stablespike.twin_differences`; the VGG does this).

The seed models (:mod:`stablespike.models`) are steppers; so is any small class a user writes.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F

from ._checks import check_tensor, describe

State = Tuple[torch.Tensor, ...]

CONTINUOUS_KINDS = ("membrane", "synaptic", "continuous")


@dataclass(frozen=True)
class StateSpec:
    """What one state tensor is: its ``layer`` index and its ``kind``.

    ``kind`` is ``"membrane"``, ``"synaptic"`` or ``"continuous"`` (perturbed and measured by the
    Lyapunov estimators) or ``"spike"`` (binary; only compared, to count spike flips).
    """

    layer: int
    kind: str

    @property
    def continuous(self) -> bool:
        return self.kind in CONTINUOUS_KINDS


@runtime_checkable
class Stepper(Protocol):
    """The stepper protocol (see the module docstring)."""

    def init_state(self, batch_size: int, device, dtype) -> State: ...

    def step(self, x_t: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]: ...


def state_spec_of(stepper, state: State) -> Tuple[StateSpec, ...]:
    """The stepper's declared :class:`StateSpec` per state tensor, or one continuous layer each."""
    spec_fn = getattr(stepper, "state_spec", None)
    spec = tuple(spec_fn()) if callable(spec_fn) else tuple(
        StateSpec(i, "continuous") for i in range(len(state))
    )
    if len(spec) != len(state):
        raise ValueError(
            f"state_spec: expected one StateSpec per state tensor ({len(state)}), got {len(spec)}"
        )
    return spec


class TwinLayout:
    """Row layout of a batch that carries ``K`` twin rows after its ``batch`` nominal rows.

    ``index`` (shape ``(K,)``, long) gives, for each twin row, the nominal row it is a twin of.
    With ``index = arange(B)`` this is the seeds' P=2 stacking, flattened trajectory-major; then
    partner rows are taken as a slice (a view) instead of a gather.

    ``differences=True``: the twins are carried as differences from their partners instead of as
    rows of the state (:mod:`stablespike.twin_differences`): the state is the nominal state
    ``(B, ...)`` followed by one difference ``(K, ...)`` per state tensor.
    """

    def __init__(self, batch: int, index: torch.Tensor, differences: bool = False):
        self.batch, self.index, self.differences = int(batch), index, bool(differences)
        self.twins = int(index.numel())
        self._all_rows = self.twins == self.batch and bool(
            torch.equal(index.cpu(), torch.arange(self.batch)))
        self._memo = {}

    def memo(self, key, make: Callable[[], object]):
        """``make()``, called once per ``key`` for this layout: for what stays the same while one
        loop runs (the layout lives as long as one estimate; parameters do not change meanwhile)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def kernel_index(self) -> Optional[torch.Tensor]:
        """``index`` as a contiguous int64 CPU tensor for a C kernel, or None when every row has
        its twin in order (row r's partner is row r)."""
        if self._all_rows:
            return None
        return self.memo("kernel_index", lambda: self.index.to("cpu", torch.int64).contiguous())

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B + K, ...)``: append a copy of each twin's nominal row."""
        return torch.cat([h, self.partner(h)], dim=0)

    def nominal(self, h: torch.Tensor) -> torch.Tensor:
        """``(B + K, ...) -> (B, ...)``: the nominal rows."""
        return h[: self.batch]

    def twin(self, h: torch.Tensor) -> torch.Tensor:
        """``(B + K, ...) -> (K, ...)``: the twin rows."""
        return h[self.batch:]

    def partner(self, h: torch.Tensor) -> torch.Tensor:
        """``(B [+ K], ...) -> (K, ...)``: the nominal row of each twin, aligned with :meth:`twin`."""
        return h[: self.batch] if self._all_rows else h.index_select(0, self.index)

    def scatter_to_partners(self, g: torch.Tensor, shape) -> torch.Tensor:
        """The adjoint of :meth:`partner` on nominal rows: ``(K, ...) -> shape = (B, ...)``, each
        twin row added into its partner row (zeros elsewhere)."""
        if self._all_rows:
            return g
        return g.new_zeros(shape).index_add_(0, self.index, g)


def full_twins(batch: int, device=None) -> TwinLayout:
    """Every nominal row gets one twin (``K = B``)."""
    return TwinLayout(batch, torch.arange(batch, device=device))


def shared_input(h: torch.Tensor, twins: Optional[TwinLayout]) -> torch.Tensor:
    """Copy a first-layer input current ``(B, ...)`` to the twin rows, ``(B + K, ...)``."""
    return h if twins is None else twins.expand(h)


def shared_dropout(h: torch.Tensor, p: float, training: bool,
                   twins: Optional[TwinLayout]) -> torch.Tensor:
    """Dropout whose mask is drawn for the nominal rows and reused by their twins.

    ``h`` has shape ``(B + K, ...)`` (or ``(B, ...)`` without twins).
    """
    if not training or p == 0.0:
        return h
    if twins is None:
        return F.dropout(h, p, training=True)
    keep = torch.empty_like(twins.nominal(h)).bernoulli_(1.0 - p) / (1.0 - p)
    return h * twins.expand(keep)


# The twin layout of the loop running now, so that monitors hooked into the stepper's modules can
# keep the nominal rows only (a context variable: per thread and task, reset when the loop ends).
_ACTIVE_TWINS: ContextVar[Optional[TwinLayout]] = ContextVar("stablespike_active_twins", default=None)


def nominal_rows(h):
    """``h`` without the Lyapunov twin rows, when called inside a loop that carries twins.

    Tensors whose first dimension is not ``B + K`` (parameters, multi-step tensors) pass unchanged.
    """
    twins = _ACTIVE_TWINS.get()
    if twins is None or not isinstance(h, torch.Tensor) or h.dim() == 0:
        return h
    return h[: twins.batch] if h.shape[0] == twins.batch + twins.twins else h


class Unrolled(NamedTuple):
    """Result of :func:`unroll`.

    ``outputs``: ``(T, B, ...)`` nominal outputs; ``state``: the final state (all rows);
    ``states``: per-step nominal states (a list of tuples) when ``record_states=True``, else None.
    """

    outputs: torch.Tensor
    state: State
    states: Optional[list]


OnStep = Callable[[int, torch.Tensor, State], Optional[State]]


def initial_state(stepper, batch: int, twins: Optional[TwinLayout], device, dtype) -> State:
    """The stepper's initial state for ``batch`` nominal rows and the twins of ``twins``: twin rows
    after the nominal ones, or, with ``twins.differences``, a zero difference per state tensor."""
    if twins is None:
        return tuple(stepper.init_state(batch, device, dtype))
    if not twins.differences:
        return tuple(stepper.init_state(batch + twins.twins, device, dtype))
    nominal = tuple(stepper.init_state(batch, device, dtype))
    return nominal + tuple(s.new_zeros((twins.twins,) + tuple(s.shape[1:])) for s in nominal)


def unroll(stepper, x: torch.Tensor, state: Optional[State] = None, *,
           twins: Optional[TwinLayout] = None, on_step: Optional[OnStep] = None,
           record_states: bool = False) -> Unrolled:
    """Run ``stepper`` over the time-first sequence ``x`` of shape ``(T, B, ...)``.

    ``state`` defaults to :func:`initial_state`. With ``twins`` the state carries ``K`` twin rows
    after the ``B`` nominal ones, or their differences (see :class:`TwinLayout`); the caller
    perturbs them before and, through ``on_step(t, out_t, state) -> state``, after each step (the
    Lyapunov estimators renormalize there). ``out_t`` given to ``on_step`` has all rows (the
    nominal ones when the twins are differences).
    """
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first")
    B = x.shape[1]
    if twins is not None and twins.batch != B:
        raise ValueError(f"twins: expected a layout for batch {B} (x.shape[1]), got batch {twins.batch}")
    differences = twins is not None and twins.differences
    if differences and not getattr(stepper, "supports_twin_differences", False):
        raise ValueError("twins: differences=True needs a stepper with supports_twin_differences, "
                         f"got {type(stepper).__name__}")
    if state is None:
        state = initial_state(stepper, B, twins, x.device, x.dtype)
    else:
        _check_rows(state, B, twins)
    shares = twins is not None and (differences or getattr(stepper, "supports_twins", False))
    token = _ACTIVE_TWINS.set(twins)
    try:
        return _loop(stepper, x, state, twins, shares, on_step, record_states)
    finally:
        _ACTIVE_TWINS.reset(token)


def _check_rows(state: State, batch: int, twins: Optional[TwinLayout]) -> None:
    K = twins.twins if twins is not None else 0
    if twins is not None and twins.differences:
        half = len(state) // 2
        expected = [batch] * half + [K] * half
        what = f"{half} nominal tensors with {batch} rows, then {half} differences with {K} rows"
    else:
        expected = [batch + K] * len(state)
        what = f"tensors with {batch + K} rows (batch {batch} + {K} twins)"
    if len(state) != len(expected) or [s.shape[0] for s in state] != expected:
        raise ValueError(f"state: expected {what}, got {[describe(s) for s in state]}")


def _loop(stepper, x, state, twins, shares, on_step, record_states) -> Unrolled:
    B = x.shape[1]
    nominal = len(state) // 2 if twins is not None and twins.differences else len(state)
    outputs, states = [], [] if record_states else None
    for t in range(x.shape[0]):
        x_t = x[t]
        if shares:
            out_t, state = stepper.step(x_t, state, twins=twins)
        else:
            out_t, state = stepper.step(x_t if twins is None else twins.expand(x_t), state)
        state = tuple(state)
        if on_step is not None:
            new_state = on_step(t, out_t, state)
            state = state if new_state is None else tuple(new_state)
        outputs.append(out_t[:B])
        if record_states:
            states.append(tuple(s[:B] for s in state[:nominal]))
    return Unrolled(torch.stack(outputs), state, states)


def batch_first_to_time_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, ...) -> (T, B, ...)`` (a view)."""
    return x.transpose(0, 1)


def select_layers(spec: Sequence[StateSpec], layers: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Indices of the continuous state tensors that belong to ``layers`` (all layers if None).

    Negative layer indices count from the last layer, as in the seeds' ``lyap_layers=[-1]``.
    """
    all_layers = sorted({s.layer for s in spec})
    if layers is None:
        chosen = set(all_layers)
    else:
        chosen = set()
        for layer in layers:
            if not -len(all_layers) <= int(layer) < len(all_layers):
                raise ValueError(
                    f"lyap_layers: expected layer indices in [-{len(all_layers)}, "
                    f"{len(all_layers) - 1}], got {list(layers)!r}"
                )
            chosen.add(all_layers[int(layer)])
    picked = tuple(i for i, s in enumerate(spec) if s.continuous and s.layer in chosen)
    if not picked:
        raise ValueError(f"lyap_layers: the layers {layers!r} hold no continuous (membrane) state")
    return picked
