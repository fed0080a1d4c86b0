"""Run any model with spiking neurons through its own forward, replacing the neurons' state
between steps: the machinery under every dynamics estimate of a module.

Hooks on every neuron found by :mod:`stablespike.neurons` read the neuron's continuous state
after each call (through its adapter: snnTorch's ``mem`` / ``syn`` attributes, spikingjelly's
``v``, norse's state tuple) and, when an estimator asks, put a replacement in its place before
the neuron's next call — perturbed or renormalized twins, re-orthonormalized tangents. The state
is replaced wherever the framework keeps it: in the call's arguments (a user loop passing ``mem``
back), inside a state tuple, or in the module's attributes (``init_hidden=True``, spikingjelly),
recognized by identity. A state that was copied or changed outside the neuron between two calls
is an error, never a silent wrong number.

Steps. The state before a neuron's first call is the framework's own (often created lazily in
that call), so the first replacement comes after the first call: ``step = -1`` names that point,
and the calls after it are steps ``0, 1, ...``.

Order. A *joint* estimator (global renormalization, a QR over all layers) replaces every
layer's state at once, so every neuron must take step ``t`` before any takes step ``t + 1`` (a
loop over time around the layers, as snnTorch and norse tutorials write it). Multi-step neurons
(spikingjelly ``step_mode="m"``) take a whole sequence per call, layer after layer; a run gives
such a neuron a forward that takes the sequence one step at a time through its adapter's
``single_step`` (the framework's own single-step arithmetic), replacing its state between steps;
layers are then handled each on its own.
"""
from __future__ import annotations

import abc
import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .context import RowLayout, nominal_rows, twin_rows
from .neurons import Layer

Replacement = Dict[int, torch.Tensor]  # id(old tensor) -> new tensor


_OPAQUE: List[Callable] = []


def _opaque() -> Callable:
    """``call(fn, *args, **kwargs)`` that torch.compile does not trace, made on first use: the
    decorator imports torch._dynamo (1.2 s), which only users of torch.compile need."""
    if not _OPAQUE:
        _OPAQUE.append(torch.compiler.disable(lambda fn, *args, **kwargs: fn(*args, **kwargs)))
    return _OPAQUE[0]


def _eager(fn):
    """``fn`` called as is in eager mode; while torch.compile traces, an opaque call (a graph
    break). ``torch.compiler.disable`` on ``fn`` itself cost ~40 us per call in eager mode too,
    6 % of a regularized MLP step."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _opaque()(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return call


class ForwardFailed(ValueError):
    """The user's forward raised while running with the extra rows (a shape error, most often)."""


class Neuron:
    """Bookkeeping of one neuron module during a run."""

    def __init__(self, layer: Layer, group: Optional[int]):
        self.layer, self.group = layer, group  # group: index among the chosen layers, or None
        self.calls = 0
        self.state: Dict[str, torch.Tensor] = {}  # continuous state after the last call
        self.spikes: Optional[torch.Tensor] = None  # spikes of the last call
        self.done = -2  # last step whose replacement was made (-1: the one after the first call)
        self.required: Replacement = {}  # must come back into the next call
        self.optional: Replacement = {}  # replaced where found (e.g. spikes fed back)
        self.places: list = []  # where in the module's attributes its state was found

    @property
    def name(self) -> str:
        return self.layer.name or type(self.layer.module).__name__

    @property
    def module(self) -> nn.Module:
        return self.layer.module

    @property
    def multistep(self) -> bool:
        return bool(self.layer.adapter.multistep(self.module, None))


class NeuronRun(abc.ABC):
    """Base of the module drivers. Subclasses say when a replacement is due (:meth:`due`),
    compute it (:meth:`replacements`), and may look at each call (:meth:`observe`) and close the
    run (:meth:`finish`). ``rows``: the number of rows every state must have."""

    rows_added = "along batch_dim"  # where the extra rows enter, for error messages
    # floating state the neurons keep is cast back to it after the run (None: left as it is)
    kept_dtype: Optional[torch.dtype] = None

    def __init__(self, model: nn.Module, layers: Sequence[Layer], chosen: Sequence[int],
                 rows: int, nominal: int, joint: bool):
        self.model, self.rows, self.nominal = model, int(rows), int(nominal)
        group = {index: g for g, index in enumerate(chosen)}
        self.neurons = [Neuron(layer, group.get(i)) for i, layer in enumerate(layers)]
        self.chosen = [n for n in self.neurons if n.group is not None]
        self.joint = joint and not any(n.multistep for n in self.chosen)

    # --- what subclasses decide ---------------------------------------------------------
    @abc.abstractmethod
    def due(self, step: int) -> bool:
        """Whether a replacement is due after ``step`` (the one after the first call always is)."""

    @abc.abstractmethod
    def replacements(self, step: int, neurons: List[Neuron]) -> None:
        """Fill ``n.required`` (and ``n.optional``) for each of ``neurons`` after ``step``."""

    def observe(self, n: Neuron, step: int) -> None:
        """Called after every call; ``n.state`` and ``n.spikes`` hold what it produced."""

    def finish(self) -> None:
        """Called after the forward."""

    def wrap_output(self, output):
        """The neuron's output as the model sees it (a subclass may cast it)."""
        return output

    def step_input(self, n: Neuron, x_t: torch.Tensor) -> torch.Tensor:
        """The input of one step of a multi-step neuron run step by step."""
        return x_t

    appends_rows = False  # whether the extra rows are appended at the neurons (else x has them)

    def extend(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A tensor with the ``nominal`` rows only, as a neuron gets it from layers before the
        first neuron, given the extra rows along ``dim`` (drivers with ``appends_rows``)."""
        return t

    def carried(self, t: torch.Tensor) -> torch.Tensor:
        """A state of ``nominal`` rows that a neuron kept from an earlier call, with the extra
        rows (each a copy of the sample it belongs to)."""
        raise TypeError(f"{type(self).__name__} adds rows but defines no carried(): a kept state "
                        "would meet inputs of another size")

    def entering(self) -> None:
        """Called as a neuron is entered (a subclass may note that the extra rows exist now)."""

    def cast_in(self, obj):
        """An argument of a neuron call in the precision the run computes in (a subclass may
        cast it); ``obj`` itself when nothing changes."""
        return obj

    def cast_kept(self, module: nn.Module) -> None:
        """The state ``module`` keeps, before its call, in the run's precision (a subclass may
        cast it)."""

    def _extended(self, obj, dim: int):
        """``obj`` (an argument of a neuron call) with each tensor of ``nominal`` rows along
        ``dim`` (its input, a state the user made for the samples) given the extra rows, in the
        run's precision. Where ``x`` came with the extra rows, only a state of ``nominal`` rows
        is extended: one the user's module kept from an earlier call (a streaming forward's
        ``self.mem``), which snnTorch would otherwise restart from zero for the wider input."""
        self.entering()
        obj = self.cast_in(obj)
        if self.rows == self.nominal or obj is None or (isinstance(obj, (tuple, list, dict)) and not obj):
            return obj
        if self.appends_rows:
            return map_tensors(obj, lambda t: self.extend(t, dim)
                               if t.dim() > dim and t.shape[dim] == self.nominal else t)
        # (B, ...) with a feature dimension: a (H,) vector broadcast over the batch (a learned
        # initial state) is not one, even where H == B
        return obj if dim != 0 else map_tensors(
            obj, lambda t: self.carried(t) if t.dim() > 1 and t.shape[0] == self.nominal else t)

    # --- the run ------------------------------------------------------------------------
    def run(self, forward, x):
        """``forward(model, x)`` with the hooks in place; the neurons keep the first ``nominal``
        rows of their state afterwards, as after a plain call."""
        handles = []
        # the tensors held now, kept alive so that their ids stay unique (a dict the model
        # mutates, such as spikingjelly's memories, would show the run's tensors by the end)
        held = [t for _, _, value in user_held_state(self.model, self.neurons) for t in _tensors_in(value)]
        try:
            for n in self.neurons:
                if self.rows != self.nominal:
                    _carry_rows(n.module, self.nominal, self.carried)
                if n.multistep:
                    _give_stepwise_forward(self, n)
                    continue
                handles.append(n.module.register_forward_pre_hook(
                    functools.partial(self._before_call, n), with_kwargs=True))
                handles.append(n.module.register_forward_hook(functools.partial(self._after_call, n)))
            with twin_rows(self.nominal, self.rows):
                try:
                    out = forward(self.model, x)
                except RuntimeError as e:  # e.g. a layer that got the samples' copies along features
                    if torch.compiler.is_compiling() or type(e).__module__.startswith("torch._"):
                        raise  # torch.compile's own errors pass through
                    raise ForwardFailed(
                        f"forward: the model failed on x with {self.rows - self.nominal} rows "
                        f"appended to its {self.nominal} samples {self.rows_added} ({e}); "
                        + _likely_cause(x, self.model, self.kept_dtype is not None)) from e
            _check_outputs(out)
            self.finish()
            return out
        finally:
            for h in handles:
                h.remove()
            for n in self.neurons:
                n.module.__dict__.pop("forward", None) if _is_stepwise(n.module) else None
                _keep_rows(n.module, RowLayout(self.nominal, self.rows), self.kept_dtype)
            self._trim_user_state(held)

    def _trim_user_state(self, before: List[torch.Tensor]) -> None:
        """State the user's own modules took from the run (a streaming forward keeping a
        neuron's returned state in ``self.state``, spikingjelly's dropout mask) restricted to the
        samples' rows, as a plain call leaves it: tensors of ``rows`` rows not in ``before``
        (the tensors held before the run)."""
        old = {id(t) for t in before}

        def trim(t):
            if id(t) in old or t.dim() == 0 or t.shape[0] != self.rows:
                return t
            t = t[: self.nominal]
            cast = self.kept_dtype is not None and t.is_floating_point() and t.dtype != self.kept_dtype
            return t.to(self.kept_dtype) if cast else t.clone()  # a view could not be detached in place
        for container, key, value in user_held_state(self.model, self.neurons):
            new = map_tensors(value, trim)
            if new is not value:
                container[key] = new

    @_eager  # bookkeeping by identity: under torch.compile a graph break per call
    def _before_call(self, n: Neuron, module, args, kwargs):
        self.cast_kept(module)
        extended_args, extended_kwargs = self._extended(args, 0), self._extended(kwargs, 0)
        extended = extended_args is not args or extended_kwargs is not kwargs
        args, kwargs = extended_args, extended_kwargs
        if n.group is None or n.calls == 0:
            return (args, kwargs) if extended else None
        self.prepare(n)
        if not (n.required or n.optional):
            return (args, kwargs) if extended else None
        replace = {**n.optional, **n.required}
        new_args, new_kwargs = _substitute(args, replace), _substitute(kwargs, replace)
        in_call = new_args is not args or new_kwargs is not kwargs
        found = _substitute_attributes(module, replace, n.places)
        # a state argument other than the returned state (a copy, or another layer's state when
        # one module serves two layers) would override the replaced attribute (snnTorch sets
        # self.mem = mem): the replacement would be silently lost
        other = not in_call and _has_tensor(args[1:], kwargs)
        if n.required and (other or not (found or in_call)):
            raise ValueError(
                f"model: the state of neuron {n.name!r} ({type(module).__name__}) returned by its "
                f"call {n.calls} did not come back into call {n.calls + 1}"
                + (" (another tensor came in its place: a copy, or is this one module used for "
                   "several layers?)" if other else
                   ", neither as an argument nor as an attribute of the neuron")
                + ", so it cannot be replaced between steps. Pass the state the neuron returned "
                "back unchanged (no copy, detach or arithmetic on it between calls), and give "
                "every layer its own neuron module.")
        n.required, n.optional = {}, {}
        return new_args, new_kwargs

    @_eager
    def _after_call(self, n: Neuron, module, args, output):
        self.record(n, output)
        return self.wrap_output(output)

    def record(self, n: Neuron, output) -> None:
        """Keep the state and spikes after a call, check their rows, let the subclass look."""
        adapter = n.layer.adapter
        before = n.state
        n.state = adapter.continuous_state(n.module, output)
        if n.group is not None and before:
            _check_same_shapes(n, before, n.state)
        spikes = adapter.spikes(n.module, output)
        n.spikes = spikes if isinstance(spikes, torch.Tensor) else None
        if n.group is not None and not n.state:
            raise ValueError(
                f"model: cannot read the state of neuron {n.name!r} ({type(n.module).__name__}): "
                "its adapter found no membrane or synaptic tensor after the call (for a registered "
                "type, give register_neuron a membrane= function)")
        for name, s in n.state.items():
            if s.dim() == 0 or s.shape[0] != self.rows:
                raise ValueError(
                    f"batch_dim: neuron {n.name!r} state {name!r} has shape {tuple(s.shape)}, "
                    f"expected {self.rows} rows in its first dimension (the {self.nominal} "
                    "samples and their copies); is batch_dim the dimension of x that indexes samples?")
        self.observe(n, n.calls - 1)
        n.calls += 1

    def prepare(self, n: Neuron) -> None:
        """Make the replacement due before ``n``'s next call: for all chosen layers at once
        (joint) or for ``n`` alone."""
        step = n.calls - 2  # the step the last call ended (-1: the first call)
        if step <= n.done or not (step == -1 or self.due(step)):
            return
        together = self.chosen if self.joint else [n]
        for other in together:
            if other.calls != n.calls:
                raise ValueError(
                    f"model: all layers are handled together here (renorm='global' or a QR over "
                    f"layers), so every neuron must take step {step + 1} before any takes the "
                    f"next; neuron {other.name!r} has taken {other.calls} steps and {n.name!r} "
                    f"{n.calls}. Use renorm='per_layer' for a model run layer after layer.")
        self.replacements(step, together)
        for other in together:
            other.done = step

    def open_intervals(self) -> List[List[Neuron]]:
        """The groups of chosen neurons whose last step has not been handled (after the run)."""
        for n in self.chosen:
            if n.calls < 2:
                raise ValueError(
                    f"model: neuron {n.name!r} took {n.calls} step(s); the estimate needs at least 2 "
                    "(the state after the first step is where it starts)")
        open_ = [n for n in self.chosen if n.calls - 2 > n.done]
        if not open_:
            return []
        groups = [self.chosen] if self.joint else [[n] for n in open_]
        for group in groups:
            if any(m.calls != group[0].calls for m in group):
                raise ValueError("model: neurons took different numbers of steps: " + ", ".join(
                    f"{m.name!r} {m.calls}" for m in group))
        return groups


def _check_same_shapes(n: Neuron, before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> None:
    """A neuron's state keeps its shape from call to call: one that changes is a module used
    for layers of different widths (snnTorch then starts it afresh, and the twins' perturbation
    would be lost without a word)."""
    for name, s in after.items():
        old = before.get(name)
        if old is not None and old.shape != s.shape:
            raise ValueError(
                f"model: the state {name!r} of neuron {n.name!r} ({type(n.module).__name__}) changed "
                f"shape from {tuple(old.shape)} to {tuple(s.shape)} at call {n.calls + 1}, so the "
                "framework started it afresh and the twins' perturbation was lost. Is this one module "
                "used for several layers (give every layer its own), or run on inputs of different "
                "sizes within one forward (estimate each size on its own)?")


# --- multi-step neurons: one step at a time ---------------------------------------------------
def _give_stepwise_forward(run: NeuronRun, n: Neuron) -> None:
    module, adapter = n.module, n.layer.adapter
    if adapter.single_step is None and adapter.step_state is None:
        raise ValueError(f"model: multi-step neuron {n.name!r} ({type(module).__name__}) cannot be "
                         "run one step at a time (its adapter has neither single_step nor step_state)")

    @_eager
    def stepwise_forward(x_seq, *args, **kwargs):
        if getattr(module, "store_v_seq", False):
            module.v_seq = None  # collected afresh for this sequence, as a multi-step call does
        state = args[0] if args else kwargs.get("state")  # norse: (input, state=None)
        x_seq, state = run._extended(x_seq, 1), run._extended(state, 0)
        outputs, states = [], []
        # unbind, not x_seq[t]: the gradient of each indexing is a zero tensor of the whole
        # sequence (a third of a regularized multi-step CSNN step's extra time)
        for x_t in x_seq.unbind(0):
            if n.group is not None and n.calls > 0:
                run.prepare(n)
                if adapter.step_state is not None:
                    state = _substitute(state, n.required)
                for name, s in n.state.items():
                    if id(s) in n.required and adapter.step_state is None:
                        setattr(module, name, n.required[id(s)])
                n.required, n.optional = {}, {}
            x_t = run.step_input(n, x_t)
            if adapter.step_state is not None:
                y, state = adapter.step_state(module, x_t, state)
                run.record(n, (y, state))
                states.append(state)
            else:
                y = adapter.single_step(module, x_t)
                run.record(n, y)
            outputs.append(run.wrap_output(y))
        out = torch.stack(outputs)
        return out if adapter.step_state is None else (out, adapter.sequence_state(module, states))

    module.__dict__["forward"] = stepwise_forward  # an instance attribute: hooks still run


def _is_stepwise(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__name__", "") == "stepwise_forward"


# --- replacing state tensors by identity -----------------------------------------------------
def _substitute(obj, replace: Replacement):
    """``obj`` with every tensor in ``replace`` (by id) swapped; ``obj`` itself when nothing was."""
    return map_tensors(obj, lambda t: replace.get(id(t), t))


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with ``fn`` applied to every tensor, through tuples (named ones too), lists and
    dicts; ``obj`` itself when ``fn`` returned every tensor unchanged."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        items = [map_tensors(o, fn) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else items
    return obj


def _check_outputs(out) -> None:
    """What a forward returns must be a tensor or a tuple or list of them (nested, with None
    allowed among them): a ValueError naming what came instead."""
    def offending(obj):
        if isinstance(obj, torch.Tensor):
            return None
        if isinstance(obj, (tuple, list)):
            return next((f"{type(obj).__name__} holding {bad}" for bad in
                         (offending(o) for o in obj if o is not None) if bad is not None), None)
        return type(obj).__name__
    bad = offending(out)
    if bad is not None:
        raise ValueError(f"forward: expected it to return a tensor or a tuple of tensors, got {bad}")


def _has_tensor(args, kwargs) -> bool:
    """Whether the call got a tensor besides its input (in tuples, lists and dicts too)."""
    stack = list(args) + list(kwargs.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            return True
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


def _substitute_attributes(module: nn.Module, replace: Replacement, places: list) -> bool:
    """Swap state tensors held as attributes of ``module``: plain attributes, buffers, and
    dictionaries of state such as spikingjelly's memories. ``places`` caches the
    ``(dictionary, key)`` pairs where they were found last time (a scan of every attribute per
    call cost ~0.1 ms). Returns whether any was found."""
    found = _swap_at(places, replace)
    if found:
        return True
    places.clear()
    for key, value in list(vars(module).items()):
        if isinstance(value, torch.Tensor):
            places.append((vars(module), key))
        elif isinstance(value, dict) and key not in ("_parameters", "_modules"):
            places.extend((value, k) for k, v in value.items() if isinstance(v, torch.Tensor))
    places[:] = [(d, k) for d, k in places if id(d[k]) in replace]
    return _swap_at(places, replace)


def _swap_at(places: list, replace: Replacement) -> bool:
    found = False
    for container, key in places:
        value = container.get(key)
        if isinstance(value, torch.Tensor) and id(value) in replace:
            container[key] = replace[id(value)]
            found = True
    return found


def kept_state(module: nn.Module):
    """``(container, key, tensor)`` for every tensor a neuron keeps between calls (not its
    parameters or persistent buffers): plain attributes, non-persistent buffers (snnTorch's
    ``mem``), and dictionaries of state such as spikingjelly's memories."""
    fixed = set(module.state_dict(keep_vars=True)) | {"_parameters", "_modules"}
    for key, value in list(vars(module).items()):
        if key in fixed:
            continue
        if isinstance(value, torch.Tensor):
            yield vars(module), key, value
        elif isinstance(value, dict):
            yield from ((value, k, v) for k, v in list(value.items())
                        if isinstance(v, torch.Tensor) and k not in fixed)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _forward_hooks, ...


def user_held_state(model: nn.Module, neurons: Sequence[Neuron]) -> list:
    """``(container, key, value)`` for what the model's modules other than its neurons hold
    between calls: attributes (and non-persistent buffers) that are tensors, or tuples, lists
    or dicts of them — a streaming forward keeping norse's state tuple in ``self.state``."""
    if not isinstance(model, nn.Module):
        return []
    skip = {id(n.module) for n in neurons}
    held = []
    for module in model.modules():
        if id(module) in skip:
            continue
        held += [(vars(module), k, v) for k, v in vars(module).items()
                 if k not in _MODULE_INTERNALS and _has_tensor((v,), {})]
        held += [(module._buffers, k, v) for k, v in module._buffers.items()
                 if k in module._non_persistent_buffers_set and v is not None]
    return held


def _tensors_in(obj) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _keep_rows(module: nn.Module, layout: RowLayout, dtype: Optional[torch.dtype] = None) -> None:
    """The state a neuron keeps restricted to the samples' rows (spikingjelly's ``v_seq`` is
    ``(T, B, ...)``) and, given ``dtype``, its floating tensors cast to it (a run in another
    precision must leave the state a plain call leaves: the next call starts from it)."""
    for container, key, value in kept_state(module):
        kept = nominal_rows(value, layout, time_first=key.endswith("_seq"))
        if dtype is not None and kept.is_floating_point() and kept.dtype != dtype:
            kept = kept.to(dtype)
        elif kept is not value:
            kept = kept.clone()  # not a view of the run's rows: the framework may detach it in place (TBPTT)
        container[key] = kept


def _carry_rows(module: nn.Module, nominal: int, extend: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """State a neuron carried over from an earlier call (a forward that does not reset its
    neurons) given the extra rows, as the samples it belongs to: without them the framework
    would start the extra rows from zero (snnTorch resets a state whose shape differs from the
    input's) or fail on the shapes."""
    for container, key, value in kept_state(module):
        if value.dim() > 0 and value.shape[0] == nominal and not key.endswith("_seq"):
            container[key] = extend(value)


def cast_floats(obj, dtype: torch.dtype):
    """Floating tensors of another dtype in ``obj`` (through tuples) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        items = [cast_floats(o, dtype) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _likely_cause(x, model: nn.Module, recast: bool = False) -> str:
    """The likelier cause of a failed forward: x's dtype where it is not the model's (an
    integer input to float layers, a float64 input to a float32 model), else batch_dim.
    ``recast``: the run cast x and the model to another precision itself (twin_dtype)."""
    weights = next((p for p in model.parameters() if p.is_floating_point()), None) \
        if isinstance(model, nn.Module) else None
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return f"x has dtype {x.dtype}: the model's layers may need x.float()"
    if recast:
        return ("the model ran in twin_dtype: a tensor the forward made in its own precision may "
                "have met one of the other; else, if batch_dim is not the dimension of x that "
                "indexes samples, that is the cause")
    if isinstance(x, torch.Tensor) and weights is not None and x.dtype != weights.dtype:
        return (f"x has dtype {x.dtype} and the model's parameters {weights.dtype}: that is the "
                f"likely cause (pass x.to({weights.dtype}))")
    return "if batch_dim is not the dimension of x that indexes samples, that is the cause"
