"""Find the spiking-neuron modules of any model and read their spikes and membranes.

One adapter per framework says how a neuron module's forward output holds its spikes and its
membrane potential, and whether that output is multi-step ``(T, B, ...)`` or single-step
``(B, ...)``:

* snnTorch (``snntorch.SpikingNeuron``: Leaky, Synaptic, RLeaky, RSynaptic, Alpha, ...): the
  output is ``spk``, ``(spk, mem)``, ``(spk, syn, mem)`` or ``(spk, syn_exc, syn_inh, mem)``; with
  ``init_hidden=True`` and ``output=False`` only ``spk`` comes back and ``mem`` is read from the
  module. Always single-step.
* spikingjelly (``BaseNode``), loaded only when spikingjelly is importable: the output is the spike
  tensor; the membrane is ``v_seq`` (multi-step with ``store_v_seq=True``) or ``v``. Monitors
  and profilers switch ``store_v_seq`` on while they are attached (:meth:`NeuronAdapter.
  record_membrane_steps`) and restore it when they are removed.
* norse (``SNNCell``, ``SNN`` and their recurrent variants), loaded only when norse is importable:
  the output is ``(z, state)`` with the membrane ``state.v``; ``SNN`` modules are multi-step and
  return every step's membrane only when built with ``record_states=True`` (else the last step's).
  Leaky integrators without a threshold (``LICell``, ``LI``, ``LIBoxCell``: readouts whose output
  is a voltage, not spikes) are not spiking neurons and are not found.
* any type registered with :func:`register_neuron`.

Adapters also read and set a neuron's firing threshold and its per-step membrane decay (the
fraction of the membrane kept from one step to the next, 1 for a non-leaky integrator), which
initialization needs: :func:`threshold_of`, :func:`scale_threshold`, :func:`decay_of`.

stablespike's own models are built from snnTorch neurons and are found through that adapter.
"""
from __future__ import annotations

import importlib
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

InstanceSpec = Union[type, Tuple[type, ...], None]


@dataclass(frozen=True)
class NeuronAdapter:
    """How to read one framework's neuron module.

    ``spikes(module, output) -> Tensor``; ``membrane(module, output) -> Tensor | None``;
    ``multistep(module, output) -> bool`` (True when tensors are ``(T, B, ...)``);
    ``threshold(module) -> Tensor | float | None`` and ``set_threshold(module, value)``;
    ``decay(module) -> float | None`` (membrane kept per step, in [0, 1]);
    ``state(module, output) -> {name: Tensor}``: the continuous state after a call (membrane,
    synaptic currents; never spikes), which the Lyapunov twins perturb and renormalize;
    ``single_step(module, x_t) -> output``: for multi-step types, one step on ``x_t (B, ...)``
    with the state kept in the module (the twin engine renormalizes between steps);
    ``step_state(module, x_t, state) -> (out_t, state)``: the same for multi-step types whose
    state is passed and returned (norse's sequence modules), the state of one step;
    ``sequence_state(module, states) -> state``: what such a module's call on the whole sequence
    returns as its state, given each step's (default: the last; norse with ``record_states``:
    all of them stacked);
    ``accepts(module) -> bool``: whether an instance of ``types`` is a spiking neuron (norse's
    leaky integrators share a base class with its spiking cells but have no threshold);
    ``keep_membrane_steps(module) -> handle | None``: makes a multi-step call expose every step's
    membrane (spikingjelly's ``store_v_seq``), the handle's ``remove()`` undoes it;
    ``membrane_steps_hint``: how a user makes a multi-step module expose them when it cannot be
    done from outside (norse: ``record_states=True``).
    """

    framework: str
    types: Tuple[type, ...]
    spikes: Callable[[nn.Module, Any], torch.Tensor]
    membrane: Callable[[nn.Module, Any], Optional[torch.Tensor]]
    multistep: Callable[[nn.Module, Any], bool]
    threshold: Callable[[nn.Module], Any] = lambda m: None
    set_threshold: Optional[Callable[[nn.Module, Any], None]] = None
    decay: Callable[[nn.Module], Optional[float]] = lambda m: None
    state: Optional[Callable[[nn.Module, Any], Dict[str, torch.Tensor]]] = None
    single_step: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None
    step_state: Optional[Callable[[nn.Module, torch.Tensor, Any], Tuple[torch.Tensor, Any]]] = None
    sequence_state: Callable[[nn.Module, List[Any]], Any] = lambda m, states: states[-1]
    accepts: Callable[[nn.Module], bool] = lambda m: True
    keep_membrane_steps: Optional[Callable[[nn.Module], Any]] = None
    membrane_steps_hint: str = "register the type with a membrane= function that returns (T, B, ...)"

    def record_membrane_steps(self, module: nn.Module):
        """Ask ``module`` to keep every step's membrane while monitored; a handle whose
        ``remove()`` restores it, or None when the adapter has no such switch."""
        return self.keep_membrane_steps(module) if self.keep_membrane_steps else None

    def continuous_state(self, module: nn.Module, output) -> Dict[str, torch.Tensor]:
        """The continuous state after a call; by default the membrane, named ``membrane``."""
        if self.state is not None:
            return self.state(module, output)
        v = self.membrane(module, output)
        return {"membrane": v} if isinstance(v, torch.Tensor) else {}


def _tensors(pairs) -> Dict[str, torch.Tensor]:
    return {n: v for n, v in pairs if isinstance(v, torch.Tensor) and v.numel() > 0}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _snntorch_adapter() -> Optional[NeuronAdapter]:
    snn = _optional("snntorch")
    if snn is None:
        return None

    def membrane(module, output):
        if isinstance(output, (tuple, list)):
            return output[-1]  # mem is always last: (spk, mem), (spk, syn, mem), (spk, ..., mem)
        return getattr(module, "mem", None)

    def decay(module):
        beta = getattr(module, "beta", None)  # Leaky, Synaptic, RLeaky, RSynaptic, Alpha
        return None if beta is None else float(torch.as_tensor(beta, dtype=torch.float64).clamp(0, 1).mean())

    def state(module, output):  # snnTorch keeps every hidden state as an attribute of the neuron
        return _tensors((n, getattr(module, n, None)) for n in ("syn", "syn_exc", "syn_inh", "mem"))

    return NeuronAdapter("snntorch", (snn.SpikingNeuron,), lambda m, out: _first(out), membrane,
                         lambda m, out: False, lambda m: m.threshold, _set_attribute("threshold"), decay,
                         state)


def _set_attribute(name: str) -> Callable[[nn.Module, Any], None]:
    """A setter that writes a tensor attribute in place (buffers and parameters keep their
    identity: optimizers and DDP still hold them) and replaces a Python number."""
    def set_value(module, value):
        current = getattr(module, name)
        if isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.copy_(torch.as_tensor(value, dtype=current.dtype).expand_as(current))
        else:
            setattr(module, name, float(value))
    return set_value


class _RestoreAttribute:
    """A hook-like handle: sets ``module.<name> = value``; ``remove()`` puts back the value the
    attribute had before the first of the handles still alive on that module was made (two
    monitors on one neuron: the first one removed leaves the switch on for the other)."""

    _live: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module, name: str, value):
        self.module, self.name = module, name
        entry = self._live.get(module)
        if entry is None:
            entry = self._live[module] = [0, getattr(module, name)]  # [handles alive, original]
        entry[0] += 1
        setattr(module, name, value)

    def remove(self) -> None:
        module, self.module = self.module, None
        entry = self._live.get(module) if module is not None else None
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            setattr(module, self.name, entry[1])
            del self._live[module]


def _spikingjelly_adapter() -> Optional[NeuronAdapter]:
    neuron = _optional("spikingjelly.activation_based.neuron")
    if neuron is None:
        return None

    def multistep(module, output):
        return getattr(module, "step_mode", "s") == "m"

    def membrane(module, output):
        v_seq = getattr(module, "v_seq", None)
        if multistep(module, output) and isinstance(v_seq, torch.Tensor):
            return v_seq
        v = getattr(module, "v", None)
        return v if isinstance(v, torch.Tensor) else None

    def decay(module):
        if isinstance(getattr(module, "tau", None), (int, float)):  # LIF: v += (x - (v - v_reset)) / tau
            return 1.0 - 1.0 / float(module.tau)
        if isinstance(getattr(module, "w", None), torch.Tensor):  # ParametricLIF: 1 / tau = sigmoid(w)
            return 1.0 - float(torch.sigmoid(module.w.detach()))
        return 1.0 if isinstance(module, neuron.IFNode) else None  # IF: no leak

    def state(module, output):
        # v, and the node's other memories: Izhikevich's adaptation w, CUBA-LIF's current c,
        # the resonate-and-fire u (leaving them out measured v's leak alone: -0.78 for -0.48);
        # not the recorded sequences (v_seq) or an online-learning trace, which no step reads
        names = ["v"] + [n for n, _ in module.named_memories()
                         if n != "v" and not n.endswith("_seq") and n != "trace"]
        return _tensors((n, getattr(module, n, None)) for n in names)

    def keep_steps(module):  # multi-step calls then store v_seq (T, B, ...); single-step: no effect
        return _RestoreAttribute(module, "store_v_seq", True) if hasattr(module, "store_v_seq") else None

    return NeuronAdapter("spikingjelly", (neuron.BaseNode,), lambda m, out: out, membrane, multistep,
                         lambda m: m.v_threshold, _set_attribute("v_threshold"), decay, state,
                         lambda m, x_t: m.single_step_forward(x_t), keep_membrane_steps=keep_steps,
                         membrane_steps_hint="construct it with store_v_seq=True")


def _norse_adapter() -> Optional[NeuronAdapter]:
    snn = _optional("norse.torch.module.snn")
    if snn is None:
        return None
    cells = tuple(getattr(snn, n) for n in ("SNNCell", "SNNRecurrentCell") if hasattr(snn, n))
    seqs = tuple(getattr(snn, n) for n in ("SNN", "SNNRecurrent") if hasattr(snn, n))

    def membrane(module, output):
        state = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        return getattr(state, "v", None)

    def threshold(module):
        return getattr(getattr(module, "p", None), "v_th", None)

    def set_threshold(module, value):  # parameters are a named tuple: replaced, never shared tensors
        module.p = module.p._replace(v_th=torch.as_tensor(value, dtype=torch.as_tensor(module.p.v_th).dtype))

    def decay(module):  # Euler step of dv/dt = tau_mem_inv * (v_leak - v + i)
        rate = getattr(getattr(module, "p", None), "tau_mem_inv", None)
        return None if rate is None else 1.0 - float(getattr(module, "dt", 0.001)) * float(torch.as_tensor(rate).mean())

    def state(module, output):  # the state named tuple of the output, spikes (z) left out
        st = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        fields = getattr(st, "_fields", ())
        return _tensors((f, getattr(st, f)) for f in fields if f != "z")

    def step_state(module, x_t, st):  # a sequence module's own forward on a one-step sequence
        recording = getattr(module, "record_states", False)
        module.record_states = False  # the step's state itself, not a stack of one
        try:
            out, st = type(module).forward(module, x_t.unsqueeze(0), st)
        finally:
            module.record_states = recording
        return out[0], st

    def sequence_state(module, states):  # record_states=True returns every step's, stacked
        return _stacked(states) if getattr(module, "record_states", False) else states[-1]

    def spiking(module):  # leaky integrators (LICell, LI, LIBoxCell) have no threshold
        return threshold(module) is not None

    return NeuronAdapter("norse", cells + seqs, lambda m, out: _first(out), membrane,
                         lambda m, out: isinstance(m, seqs), threshold, set_threshold, decay, state,
                         step_state=step_state, sequence_state=sequence_state, accepts=spiking,
                         membrane_steps_hint="construct it with record_states=True")


def _stacked(states: List[Any]):
    """Per-step states (tensors, or named tuples of them) stacked along a new first dimension."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(states)
    return type(first)(*(_stacked(list(field)) for field in zip(*states)))


def _optional(module_name: str):
    """The framework's module, only if the user's program has imported the framework: a model
    holding its neurons must have. Importing spikingjelly or norse ourselves would cost a plain
    snnTorch user ~1.5 s and their deprecation warnings."""
    if module_name.split(".")[0] not in sys.modules:
        return None
    try:
        return importlib.import_module(module_name)
    except Exception:  # broken beside this torch: the adapter is simply absent
        return None


class NeuronRegistry:
    """The adapters in use: the built-in frameworks that import, plus registered types."""

    def __init__(self):
        self._builtin: Dict[str, Optional[NeuronAdapter]] = {}  # framework -> adapter, once imported
        self._custom: Dict[type, NeuronAdapter] = {}

    def register(self, neuron_type: type, spikes: Optional[Callable] = None,
                 membrane: Optional[Callable] = None, multistep: bool = False,
                 threshold: Optional[str] = None, decay: Optional[Callable] = None) -> None:
        """Make ``neuron_type`` a spiking neuron. ``spikes(module, output)`` defaults to the output
        (or its first element), ``membrane(module, output)`` to the module's ``mem`` or ``v``;
        ``threshold``: the name of the attribute holding the firing threshold (for threshold
        calibration); ``decay(module) -> float``: the membrane kept per step (for fluctuation_init)."""
        if not isinstance(neuron_type, type) or not issubclass(neuron_type, nn.Module):
            raise TypeError(f"neuron_type: expected an nn.Module subclass, got {neuron_type!r}")
        for arg, value in (("spikes", spikes), ("membrane", membrane), ("decay", decay)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg}: expected a function (module, output) or None, got {value!r}")
        if threshold is not None and not isinstance(threshold, str):
            raise TypeError(f"threshold: expected the name of an attribute (str) or None, got {threshold!r}")
        if not isinstance(multistep, bool):
            raise TypeError(f"multistep: expected True or False, got {multistep!r}")
        default_membrane = lambda m, out: getattr(m, "mem", getattr(m, "v", None))  # noqa: E731
        self._custom[neuron_type] = NeuronAdapter(
            "registered", (neuron_type,), spikes or (lambda m, out: _first(out)),
            membrane or default_membrane, lambda m, out: bool(multistep),
            (lambda m: getattr(m, threshold)) if threshold else (lambda m: None),
            _set_attribute(threshold) if threshold else None, decay or (lambda m: None))

    def unregister(self, neuron_type: type) -> None:
        self._custom.pop(neuron_type, None)

    def adapters(self) -> List[NeuronAdapter]:
        for framework, make in _FRAMEWORKS:  # a framework imported since the last call joins now
            if framework not in self._builtin and framework in sys.modules:
                self._builtin[framework] = make()
        return list(self._custom.values()) + [a for a in self._builtin.values() if a is not None]

    def adapter_for(self, module: nn.Module) -> Optional[NeuronAdapter]:
        for adapter in self.adapters():
            if isinstance(module, adapter.types) and adapter.accepts(module):
                return adapter
        return None


_FRAMEWORKS = (("snntorch", _snntorch_adapter), ("spikingjelly", _spikingjelly_adapter),
               ("norse", _norse_adapter))
DEFAULT_REGISTRY = NeuronRegistry()


def register_neuron(neuron_type: type, spikes: Optional[Callable] = None,
                    membrane: Optional[Callable] = None, multistep: bool = False,
                    threshold: Optional[str] = None, decay: Optional[Callable] = None) -> None:
    """Register a custom neuron type with the default registry (see :meth:`NeuronRegistry.register`)."""
    DEFAULT_REGISTRY.register(neuron_type, spikes, membrane, multistep, threshold, decay)


def _adapter_of(neuron: nn.Module, registry: Optional[NeuronRegistry]) -> NeuronAdapter:
    adapter = (registry or DEFAULT_REGISTRY).adapter_for(neuron)
    if adapter is None:
        raise ValueError(f"neuron: {type(neuron).__name__} is not a known spiking neuron "
                         "(register it with stablespike.register_neuron)")
    return adapter


def threshold_of(neuron: nn.Module, registry: Optional[NeuronRegistry] = None) -> float:
    """The neuron's firing threshold (the mean, for per-neuron thresholds)."""
    value = _adapter_of(neuron, registry).threshold(neuron)
    if value is None:
        raise ValueError(f"neuron: {type(neuron).__name__} exposes no firing threshold to stablespike "
                         "(for a registered type, pass threshold='<attribute name>' to register_neuron)")
    return float(torch.as_tensor(value, dtype=torch.float64).mean())


def scale_threshold(neuron: nn.Module, factor: float, bounds=(0.0, float("inf")),
                    registry: Optional[NeuronRegistry] = None) -> float:
    """Multiply the neuron's threshold by ``factor``, clamped to ``bounds``; returns its new mean."""
    adapter = _adapter_of(neuron, registry)
    value = adapter.threshold(neuron)
    if value is None or adapter.set_threshold is None:
        threshold_of(neuron, registry)  # raises the error that names what is missing
    new = (torch.as_tensor(value, dtype=torch.float64) * factor).clamp(*bounds)
    adapter.set_threshold(neuron, new if new.dim() else float(new))
    return threshold_of(neuron, registry)


def decay_of(neuron: nn.Module, registry: Optional[NeuronRegistry] = None) -> float:
    """The fraction of the membrane the neuron keeps from one step to the next (snnTorch ``beta``,
    spikingjelly ``1 - 1/tau``, norse ``1 - dt * tau_mem_inv``; 1 for an integrate-and-fire)."""
    value = _adapter_of(neuron, registry).decay(neuron)
    if value is None:
        raise ValueError(f"neuron: {type(neuron).__name__} exposes no membrane decay to stablespike "
                         "(for a registered type, pass decay=... to register_neuron)")
    return float(value)


@dataclass(frozen=True)
class Layer:
    """A monitored module: its qualified ``name``, the ``module``, and its adapter (None when the
    module is not a known neuron, e.g. an ``nn.Linear`` chosen through ``instance``)."""

    name: str
    module: nn.Module
    adapter: Optional[NeuronAdapter]


def find_layers(model: nn.Module, instance: InstanceSpec = None,
                registry: Optional[NeuronRegistry] = None) -> List[Layer]:
    """The modules of ``model`` to monitor, in ``named_modules`` order.

    ``instance`` None: every spiking neuron the registry knows. A type or tuple of types: the
    modules of those types (neurons or not). Raises ValueError when nothing matches, naming the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"net: expected an nn.Module, got {type(model).__name__}")
    _check_instance(instance)
    if registry is not None and not isinstance(registry, NeuronRegistry):
        raise TypeError(f"registry: expected a NeuronRegistry or None, got {type(registry).__name__}")
    registry = registry or DEFAULT_REGISTRY
    layers = []
    for name, module in model.named_modules():
        adapter = registry.adapter_for(module)
        wanted = adapter is not None if instance is None else isinstance(module, instance)
        if wanted:
            layers.append(Layer(name, module, adapter))
    if not layers:
        frameworks = ", ".join(a.framework for a in registry.adapters()) or "none importable"
        what = (f"no spiking-neuron modules (adapters: {frameworks}; register other types with "
                "stablespike.register_neuron)") if instance is None else f"no modules of type {instance!r}"
        raise ValueError(f"net: {type(model).__name__} has {what}")
    return layers


def _check_instance(instance: InstanceSpec) -> None:
    """``instance``: None, a class, or a tuple of classes (as ``isinstance`` takes them)."""
    classes = instance if isinstance(instance, tuple) else (instance,)
    if instance is not None and (not classes or not all(isinstance(c, type) for c in classes)):
        raise TypeError(f"instance: expected None, a module class or a tuple of module classes, "
                        f"got {type(instance).__name__} {instance!r}")


def find_neurons(model: nn.Module, registry: Optional[NeuronRegistry] = None) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every spiking neuron in ``model``."""
    return [(layer.name, layer.module) for layer in find_layers(model, None, registry)]


def neuron_types(registry: Optional[NeuronRegistry] = None) -> Tuple[Type[nn.Module], ...]:
    """All neuron classes the registry recognizes (for ``isinstance`` checks)."""
    return tuple(t for a in (registry or DEFAULT_REGISTRY).adapters() for t in a.types)
