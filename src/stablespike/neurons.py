"""Find the spiking-neuron modules of any model and read their spikes and membranes.

One adapter per framework says how a neuron module's forward output holds its spikes and its
membrane potential, and whether that output is multi-step ``(T, B, ...)`` or single-step
``(B, ...)``:

* snnTorch (``snntorch.SpikingNeuron``: Leaky, Synaptic, RLeaky, RSynaptic, Alpha, ...): the
  output is ``spk``, ``(spk, mem)``, ``(spk, syn, mem)`` or ``(spk, syn_exc, syn_inh, mem)``; with
  ``init_hidden=True`` and ``output=False`` only ``spk`` comes back and ``mem`` is read from the
  module. Always single-step.
* spikingjelly (``BaseNode``), loaded only when spikingjelly is importable: the output is the spike
  tensor; the membrane is ``v_seq`` (multi-step with ``store_v_seq=True``) or ``v``.
* norse (``SNNCell``, ``SNN`` and their recurrent variants), loaded only when norse is importable:
  the output is ``(z, state)`` with the membrane ``state.v``; ``SNN`` modules are multi-step.
* any type registered with :func:`register_neuron`.

stablespike's own models are built from snnTorch neurons and are found through that adapter.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

InstanceSpec = Union[type, Tuple[type, ...], None]


@dataclass(frozen=True)
class NeuronAdapter:
    """How to read one framework's neuron module.

    ``spikes(module, output) -> Tensor``; ``membrane(module, output) -> Tensor | None``;
    ``multistep(module, output) -> bool`` (True when tensors are ``(T, B, ...)``).
    """

    framework: str
    types: Tuple[type, ...]
    spikes: Callable[[nn.Module, Any], torch.Tensor]
    membrane: Callable[[nn.Module, Any], Optional[torch.Tensor]]
    multistep: Callable[[nn.Module, Any], bool]


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

    return NeuronAdapter("snntorch", (snn.SpikingNeuron,), lambda m, out: _first(out), membrane,
                         lambda m, out: False)


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

    return NeuronAdapter("spikingjelly", (neuron.BaseNode,), lambda m, out: out, membrane, multistep)


def _norse_adapter() -> Optional[NeuronAdapter]:
    snn = _optional("norse.torch.module.snn")
    if snn is None:
        return None
    cells = tuple(getattr(snn, n) for n in ("SNNCell", "SNNRecurrentCell") if hasattr(snn, n))
    seqs = tuple(getattr(snn, n) for n in ("SNN", "SNNRecurrent") if hasattr(snn, n))

    def membrane(module, output):
        state = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        return getattr(state, "v", None)

    return NeuronAdapter("norse", cells + seqs, lambda m, out: _first(out), membrane,
                         lambda m, out: isinstance(m, seqs))


def _optional(module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception:  # not installed, or broken beside this torch: the adapter is simply absent
        return None


class NeuronRegistry:
    """The adapters in use: the built-in frameworks that import, plus registered types."""

    def __init__(self):
        self._builtin: Optional[List[NeuronAdapter]] = None
        self._custom: Dict[type, NeuronAdapter] = {}

    def register(self, neuron_type: type, spikes: Optional[Callable] = None,
                 membrane: Optional[Callable] = None, multistep: bool = False) -> None:
        """Make ``neuron_type`` a spiking neuron. ``spikes(module, output)`` defaults to the output
        (or its first element), ``membrane(module, output)`` to the module's ``mem`` or ``v``."""
        if not isinstance(neuron_type, type) or not issubclass(neuron_type, nn.Module):
            raise TypeError(f"neuron_type: expected an nn.Module subclass, got {neuron_type!r}")
        default_membrane = lambda m, out: getattr(m, "mem", getattr(m, "v", None))  # noqa: E731
        self._custom[neuron_type] = NeuronAdapter(
            "registered", (neuron_type,), spikes or (lambda m, out: _first(out)),
            membrane or default_membrane, lambda m, out: bool(multistep))

    def unregister(self, neuron_type: type) -> None:
        self._custom.pop(neuron_type, None)

    def adapters(self) -> List[NeuronAdapter]:
        if self._builtin is None:  # import the optional frameworks once, on first use
            found = (_snntorch_adapter(), _spikingjelly_adapter(), _norse_adapter())
            self._builtin = [a for a in found if a is not None]
        return list(self._custom.values()) + self._builtin

    def adapter_for(self, module: nn.Module) -> Optional[NeuronAdapter]:
        for adapter in self.adapters():
            if isinstance(module, adapter.types):
                return adapter
        return None


DEFAULT_REGISTRY = NeuronRegistry()


def register_neuron(neuron_type: type, spikes: Optional[Callable] = None,
                    membrane: Optional[Callable] = None, multistep: bool = False) -> None:
    """Register a custom neuron type with the default registry (see :meth:`NeuronRegistry.register`)."""
    DEFAULT_REGISTRY.register(neuron_type, spikes, membrane, multistep)


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


def find_neurons(model: nn.Module, registry: Optional[NeuronRegistry] = None) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every spiking neuron in ``model``."""
    return [(layer.name, layer.module) for layer in find_layers(model, None, registry)]


def neuron_types(registry: Optional[NeuronRegistry] = None) -> Tuple[Type[nn.Module], ...]:
    """All neuron classes the registry recognizes (for ``isinstance`` checks)."""
    return tuple(t for a in (registry or DEFAULT_REGISTRY).adapters() for t in a.types)
