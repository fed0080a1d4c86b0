"""The twin engine's module driver: Lyapunov twins inside any model with spiking neurons.

The model runs through the user's own ``forward(model, x)`` on the batch extended with twin rows
(:class:`~stablespike.twins.TwinRows`). Hooks on every neuron found by :mod:`stablespike.neurons`
read the neuron's continuous state after each call (through its adapter: snnTorch's ``mem`` and
``syn`` attributes, spikingjelly's ``v``, norse's state tuple) and put the perturbed or
renormalized state in its place before the neuron's next call. The state is replaced wherever the
framework keeps it: in the call's arguments (a user loop passing ``mem`` back), inside a state
tuple, or in the module's attributes (``init_hidden=True``, spikingjelly) — recognized by identity,
so a state copied or changed outside the neuron between two calls is an error, never a silent
wrong number.

Steps. The state before a neuron's first call is the framework's own (often created lazily in
that call), so the perturbation is put on the state after the first call, and the ``T - 1``
following calls are the measured steps.

Order. ``renorm="global"`` rescales all layers together, so every neuron must take step ``t``
before any takes step ``t + 1`` (a loop over time around the layers, as snnTorch and norse
tutorials write it). Multi-step neurons (spikingjelly ``step_mode="m"``) take a whole sequence
per call, layer after layer; the driver runs such a neuron one step at a time (its own
single-step forward, the same arithmetic) and rescales it after every step, each layer to its
share ``eps / sqrt(L)`` — the ``per_layer`` mode, which the result then reports.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .context import RowLayout, nominal_rows, twin_rows
from .neurons import Layer
from .sharing import shared_across_twins
from .twins import TwinEstimate, TwinRows


class _Neuron:
    """Bookkeeping of one neuron module during a run."""

    def __init__(self, layer: Layer, group: Optional[int]):
        self.layer, self.group = layer, group  # group: index among the perturbed layers, or None
        self.calls = 0
        self.state: Dict[str, torch.Tensor] = {}  # continuous state after the last call
        self.done = -2  # last step handled (-1: the perturbation after the first call)
        self.replace: Dict[int, torch.Tensor] = {}  # id(old state tensor) -> its replacement

    @property
    def name(self) -> str:
        return self.layer.name or type(self.layer.module).__name__


class ModuleTwins:
    """Runs ``forward(model, x)`` with twins; see the module docstring."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], chosen: Sequence[int],
                 estimate: TwinEstimate, generator: Optional[torch.Generator],
                 dtype: Optional[torch.dtype] = None):
        self.model, self.estimate, self.generator = model, estimate, generator
        # floating outputs of the neurons are cast to it: snnTorch's spike functions return
        # float32 whatever the membrane's dtype, which a float64 run must not see
        self.dtype = dtype
        self.rows: TwinRows = estimate.rows
        group = {index: g for g, index in enumerate(chosen)}
        self.neurons = [_Neuron(layer, group.get(i)) for i, layer in enumerate(layers)]
        self.perturbed = [n for n in self.neurons if n.group is not None]

    def run(self, forward, x: torch.Tensor):
        handles = []
        try:
            for n in self.neurons:
                module = n.layer.module
                if n.layer.adapter.multistep(module, None):
                    _stepwise(self, n)
                    continue
                handles.append(module.register_forward_pre_hook(
                    functools.partial(self._before_call, n), with_kwargs=True))
                handles.append(module.register_forward_hook(functools.partial(self._after_call, n)))
            with shared_across_twins(self.model, self.rows), twin_rows(self.rows.batch, self.rows.total):
                out = forward(self.model, x)
            self._finish()
        finally:
            for h in handles:
                h.remove()
            for n in self.neurons:
                if _is_stepwise(n.layer.module):
                    del n.layer.module.__dict__["forward"]
                _keep_nominal_rows(n.layer.module, self.rows)
        return out

    # --- hooks ----------------------------------------------------------------------------
    def _before_call(self, n: _Neuron, module, args, kwargs):
        if n.group is None or n.calls == 0:
            return None
        self._prepare(n)
        if not n.replace:
            return None
        new_args, new_kwargs = _substitute(args, n.replace), _substitute(kwargs, n.replace)
        found = _substitute_attributes(module, n.replace)
        if not found and new_args is args and new_kwargs is kwargs:
            raise ValueError(
                f"model: the state of neuron {n.name!r} ({type(module).__name__}) returned by its "
                f"call {n.calls} did not come back into call {n.calls + 1}, neither as an argument "
                "nor as an attribute of the neuron; the Lyapunov twins cannot be renormalized. "
                "Pass the state the neuron returned back unchanged (no copy, detach or arithmetic "
                "on it between calls).")
        n.replace = {}
        return new_args, new_kwargs

    def _after_call(self, n: _Neuron, module, args, output):
        self._observe(n, module, output, step=n.calls - 1)
        n.calls += 1
        return None if self.dtype is None else _cast(output, self.dtype)

    def _observe(self, n: _Neuron, module, output, step: int) -> None:
        """Keep the state after a call and count spike flips of the step it ended."""
        adapter = n.layer.adapter
        n.state = adapter.continuous_state(module, output)
        if n.group is not None and not n.state:
            raise ValueError(
                f"model: cannot read the state of neuron {n.name!r} ({type(module).__name__}): its "
                "adapter found no membrane or synaptic tensor after the call (for a registered "
                "type, give register_neuron a membrane= function)")
        for name, s in n.state.items():
            if s.shape[0] != self.rows.total:
                raise ValueError(
                    f"batch_dim: neuron {n.name!r} state {name!r} has shape {tuple(s.shape)}, "
                    f"expected {self.rows.total} rows (the batch of {self.rows.batch} samples "
                    f"and {self.rows.twins} twins) in its first dimension; is batch_dim the "
                    "dimension of x that indexes samples?")
        if step >= 0 and self.estimate.count_flips:
            with torch.no_grad():
                spikes = adapter.spikes(module, output)
                if isinstance(spikes, torch.Tensor) and spikes.shape[:1] == (self.rows.total,):
                    self.estimate.record_flips(step, self.rows.difference(spikes).ne(0).flatten(1).any(1))

    # --- perturbation and renormalization ----------------------------------------------------
    def _pending_step(self, n: _Neuron) -> Optional[int]:
        """The step after which ``n`` must be perturbed (-1) or renormalized, if not done yet."""
        last = n.calls - 2  # the step the last call ended (-1: the first call)
        if last <= n.done:
            return None
        if last == -1 or self.estimate.is_boundary(last):
            return last
        return None

    def _prepare(self, n: _Neuron) -> None:
        """Fill ``n.replace`` for its next call: jointly for all layers (global) or for ``n``."""
        step = self._pending_step(n)
        if step is None:
            return
        together = self.perturbed if self.estimate.renorm == "global" else [n]
        for other in together:
            if other.calls != n.calls:
                raise ValueError(
                    f"renorm: 'global' rescales all layers together, so every neuron must take "
                    f"step {step + 1} before any takes the next; neuron {other.name!r} has taken "
                    f"{other.calls} steps and {n.name!r} {n.calls}. Use renorm='per_layer'.")
        new = self._new_differences(step, together)
        for other in together:
            other.done = step
            for (name, s), d in zip(other.state.items(), new[other.group]):
                other.replace[id(s)] = self.rows.with_difference(s, d)

    def _new_differences(self, step: int, neurons: List[_Neuron]) -> Dict[int, List[torch.Tensor]]:
        rows, est = self.rows, self.estimate
        if step == -1:  # the perturbation: a random direction of norm eps (or the layer's share)
            shapes = [(rows.twins,) + tuple(s.shape[1:]) for n in neurons for s in n.state.values()]
            like = next(iter(neurons[0].state.values()))
            flat = iter(est.perturbation(shapes, like, self.generator))
            return {n.group: [next(flat) for _ in n.state] for n in neurons}
        diffs = {n.group: [rows.difference(s) for s in n.state.values()] for n in neurons}
        if est.renorm == "global":  # one group in the estimate; split back per neuron
            new = iter(est.renormalize(step, {0: [d for n in neurons for d in diffs[n.group]]})[0])
            return {n.group: [next(new) for _ in n.state] for n in neurons}
        return est.renormalize(step, diffs)

    def _finish(self) -> None:
        """Measure the interval still open at the end of the run (no renormalization follows)."""
        for n in self.perturbed:
            if n.calls < 2:
                raise ValueError(
                    f"model: neuron {n.name!r} took {n.calls} step(s); a finite-difference estimate "
                    "needs at least 2 (the state after the first step is perturbed)")
        open_ = [n for n in self.perturbed if n.calls - 2 > n.done]
        if self.estimate.renorm == "global" and open_:
            self._measure_final(self.perturbed)
        else:
            for n in open_:
                self._measure_final([n])

    def _measure_final(self, neurons: List[_Neuron]) -> None:
        step = neurons[0].calls - 2
        for n in neurons:
            if n.calls - 2 != step:
                raise ValueError(f"model: neurons took different numbers of steps "
                                 f"({neurons[0].name!r}: {step + 2}, {n.name!r}: {n.calls})")
        self._new_differences(step, neurons)
        for n in neurons:
            n.done = step


# --- multi-step neurons: one step at a time ---------------------------------------------------
def _stepwise(driver: ModuleTwins, n: _Neuron) -> None:
    """Give the multi-step neuron ``n`` a forward that runs its sequence ``(T, B + K, ...)`` one
    step at a time through its adapter's ``single_step``, perturbing after the first step and
    renormalizing after every interval, each layer on its own (the ``per_layer`` mode)."""
    module, adapter = n.layer.module, n.layer.adapter
    if adapter.single_step is None:
        raise ValueError(f"model: multi-step neuron {n.name!r} ({type(module).__name__}) cannot be "
                         "run one step at a time (its adapter has no single_step)")
    if n.group is not None and driver.estimate.renorm == "global" and len(driver.perturbed) > 1:
        raise RuntimeError("internal: multi-step neurons need renorm='per_layer'")

    def stepwise_forward(x_seq, *args, **kwargs):
        if getattr(module, "store_v_seq", False):
            module.v_seq = None  # collected afresh for this sequence, as a multi-step call does
        outputs = []
        for t in range(x_seq.shape[0]):
            if n.group is not None and n.calls > 0:
                driver._prepare(n)
                for name, s in n.state.items():
                    if id(s) in n.replace:
                        setattr(module, name, n.replace[id(s)])
                n.replace = {}
            y = adapter.single_step(module, x_seq[t])
            y = y if driver.dtype is None else _cast(y, driver.dtype)
            driver._observe(n, module, y, step=n.calls - 1)
            n.calls += 1
            outputs.append(y)
        return torch.stack(outputs)

    module.__dict__["forward"] = stepwise_forward


def _is_stepwise(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return getattr(f, "__name__", "") == "stepwise_forward"


def _cast(obj, dtype: torch.dtype):
    """Floating tensors of another dtype in ``obj`` (through tuples) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        items = [_cast(o, dtype) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


# --- replacing state tensors by identity -----------------------------------------------------
def _substitute(obj, replace: Dict[int, torch.Tensor]):
    """``obj`` with every tensor in ``replace`` (by id) swapped, through tuples (named ones too),
    lists and dicts; ``obj`` itself when nothing was swapped."""
    if isinstance(obj, torch.Tensor):
        return replace.get(id(obj), obj)
    if isinstance(obj, (tuple, list)):
        items = [_substitute(o, replace) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        items = {k: _substitute(v, replace) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else items
    return obj


def _substitute_attributes(module: nn.Module, replace: Dict[int, torch.Tensor]) -> bool:
    """Swap state tensors held as attributes of ``module`` (plain attributes, buffers, and
    dictionaries of state such as spikingjelly's memories). Returns whether any was found."""
    found = False
    for key, value in list(vars(module).items()):
        if isinstance(value, torch.Tensor) and id(value) in replace:
            setattr(module, key, replace[id(value)])
            found = True
        elif isinstance(value, dict) and key != "_parameters":
            for k, v in list(value.items()):
                if isinstance(v, torch.Tensor) and id(v) in replace:
                    value[k] = replace[id(v)]
                    found = True
    return found


def _keep_nominal_rows(module: nn.Module, rows: TwinRows) -> None:
    """After the run, the state a neuron keeps (not its parameters or persistent buffers) holds
    the samples' rows only, as after a plain call."""
    layout = RowLayout(rows.batch, rows.total)
    fixed = set(module.state_dict(keep_vars=True)) | {"_parameters", "_modules"}
    for key, value in list(vars(module).items()):
        if key in fixed:
            continue
        if isinstance(value, torch.Tensor):
            setattr(module, key, nominal_rows(value, layout))
        elif isinstance(value, dict):
            for k, v in list(value.items()):
                if isinstance(v, torch.Tensor) and k not in fixed:
                    value[k] = nominal_rows(v, layout)
