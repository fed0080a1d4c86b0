"""The one time loop for steppers, and the twin engine's stepper driver.

A *stepper* is anything with

* ``init_state(batch_size, device, dtype) -> state`` — ``state`` is a tuple of tensors whose
  first dimension is the batch;
* ``step(x_t, state) -> (out_t, state)`` — one time step, ``x_t`` of shape ``(B, ...)``;

and optionally

* ``state_spec() -> tuple[StateSpec, ...]`` — what each state tensor is (layer, kind). Without it
  every tensor is a continuous state of its own layer. The Lyapunov estimators perturb and measure
  only continuous kinds (membrane, synaptic current), never spikes.

Steppers are for plain dynamical systems (maps, rate RNNs) and anything a user writes step by
step. The step knows nothing of Lyapunov twins: :func:`run_twins` gives it a batch of ``B + K``
rows (the twins after the samples) and keeps the bookkeeping (:mod:`stablespike.twins`). Modules
with spiking neurons need no stepper at all (:mod:`stablespike.neuron_twins`).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from ._checks import check_tensor, describe
from .twins import TwinEstimate

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


class Unrolled(NamedTuple):
    """Result of :func:`unroll`.

    ``outputs``: ``(T, B, ...)`` nominal outputs; ``state``: the final state (all rows);
    ``states``: per-step nominal states (a list of tuples) when ``record_states=True``, else None.
    """

    outputs: torch.Tensor
    state: State
    states: Optional[list]


OnStep = Callable[[int, torch.Tensor, State], Optional[State]]


def unroll(stepper, x: torch.Tensor, state: Optional[State] = None, *,
           on_step: Optional[OnStep] = None, record_states: bool = False) -> Unrolled:
    """Run ``stepper`` over the time-first sequence ``x`` of shape ``(T, B, ...)``.

    ``state`` defaults to ``stepper.init_state(B, ...)``; ``on_step(t, out_t, state) -> state``
    may replace the state after each step (the estimators use it).
    """
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first")
    if state is None:
        state = tuple(stepper.init_state(x.shape[1], x.device, x.dtype))
    elif any(not isinstance(s, torch.Tensor) or s.shape[:1] != x.shape[1:2] for s in state):
        raise ValueError(f"state: expected tensors with {x.shape[1]} rows (x.shape[1]), got "
                         f"{[describe(s) for s in state]}")
    outputs, states = [], [] if record_states else None
    for t, x_t in enumerate(x.unbind(0)):  # unbind: one gradient node, not a zero tensor per step
        out_t, state = stepper.step(x_t, state)
        state = tuple(state)
        if on_step is not None:
            new_state = on_step(t, out_t, state)
            state = state if new_state is None else tuple(new_state)
        outputs.append(out_t)
        if record_states:
            states.append(state)
    return Unrolled(torch.stack(outputs), state, states)


def is_stepper(model) -> bool:
    """Whether ``model`` has the stepper methods ``init_state`` and ``step``."""
    return callable(getattr(model, "init_state", None)) and callable(getattr(model, "step", None))


def run_twins(stepper, x: torch.Tensor, estimate: TwinEstimate, chosen: Sequence[int],
              spec: Sequence[StateSpec], generator: Optional[torch.Generator],
              record_states: bool = False) -> Unrolled:
    """The stepper driver: unroll ``stepper`` over ``x`` ``(T, B, ...)`` with the twin rows of
    ``estimate.rows`` appended to the batch; the state tensors ``chosen`` (continuous ones of the
    chosen layers) are perturbed before the first step and measured and renormalized after every
    interval. Returns the nominal outputs ``(T, B, ...)``, the final state (all rows) and, with
    ``record_states``, the nominal state of every step."""
    rows, T = estimate.rows, x.shape[0]
    spikes = [i for i, s in enumerate(spec) if s.kind == "spike"]
    by_group = _groups(spec, chosen, estimate.renorm)
    state = list(stepper.init_state(rows.total, x.device, x.dtype))
    for g, members in by_group.items():
        shapes = [(rows.twins,) + tuple(state[i].shape[1:]) for i in members]
        for i, d in zip(members, estimate.perturbation(shapes, state[members[0]], generator)):
            state[i] = rows.with_difference(state[i], d)

    def on_step(t, out_t, state):
        if record_states:
            recorded.append(tuple(s[: rows.batch] for s in state))
        if spikes:
            with torch.no_grad():
                estimate.record_flips(t, torch.stack([rows.difference(state[i]).ne(0).flatten(1).any(1)
                                                      for i in spikes]).any(0))
        if not (estimate.is_boundary(t) or t == T - 1):
            return state
        members = [i for g in by_group.values() for i in g]
        groups = [g for g, m in by_group.items() for _ in m]
        new, state = estimate.renormalize(t, [state[i] for i in members], groups), list(state)
        for i, s in zip(members, new):
            state[i] = s
        return state

    recorded = []
    run = unroll(stepper, rows.extend(x, dim=1), tuple(state), on_step=on_step)
    return Unrolled(run.outputs[:, : rows.batch], run.state, recorded if record_states else None)


def _groups(spec, chosen, renorm) -> dict:
    """State indices renormalized together: one group (global) or one per layer."""
    if renorm == "global":
        return {0: list(chosen)}
    layers = sorted({spec[i].layer for i in chosen})
    return {g: [i for i in chosen if spec[i].layer == layer] for g, layer in enumerate(layers)}


def batch_first_to_time_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, ...) -> (T, B, ...)`` (a view)."""
    return x.transpose(0, 1)


def layer_indices(count: int, layers: Optional[Sequence[int]], argument: str, what: str) -> List[int]:
    """The sorted distinct indices in ``0..count-1`` that ``layers`` names (all if None); negative
    indices count from the last layer, as in the seeds' ``lyap_layers=[-1]``. ``argument`` and
    ``what`` ("layer", "neuron layer") name them in the error for an index out of range."""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{argument}: expected a list of {what} indices (e.g. [0] or [-1]), got "
                         f"{type(layers).__name__} {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{argument}: expected at least one {what} index (None: all of them), got []")
    chosen = set()
    for layer in layers:
        try:
            index = None if isinstance(layer, bool) else operator.index(layer)  # no 1.5, no True
        except TypeError:
            index = None
        if index is None or not -count <= index < count:
            raise ValueError(f"{argument}: expected {what} indices in [-{count}, {count - 1}], got "
                             f"{list(layers)!r}")
        chosen.add(index % count)
    return sorted(chosen)


def select_layers(spec: Sequence[StateSpec], layers: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Indices of the continuous state tensors that belong to ``layers`` (all layers if None),
    counted as :func:`layer_indices` counts them."""
    all_layers = sorted({s.layer for s in spec})
    chosen = {all_layers[i] for i in layer_indices(len(all_layers), layers, "lyap_layers", "layer")}
    picked = tuple(i for i, s in enumerate(spec) if s.continuous and s.layer in chosen)
    if not picked:
        raise ValueError(f"lyap_layers: the layers {layers!r} hold no continuous (membrane) state")
    return picked
