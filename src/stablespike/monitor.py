"""Hook-based monitors with spikingjelly's API, for snnTorch, spikingjelly, norse and custom neurons.

``OutputMonitor``, ``InputMonitor``, ``AttributeMonitor``, ``GradOutputMonitor`` and
``GradInputMonitor`` behave as in spikingjelly (seed 004): ``records`` (a list, in call order),
``monitor[i]`` and ``monitor['layer name']``, ``monitored_layers``, ``clear_recorded_data()``,
``enable()`` / ``disable()`` / ``is_enable()``, ``remove_hooks()``, ``close()`` and ``with``.

Differences, on purpose:

* ``instance=None`` means every spiking neuron that :mod:`stablespike.neurons` finds (not
  ``type(net)``); a model without one, or an ``instance`` that matches nothing, raises ValueError.
* For neuron modules the monitors record *spikes* (snnTorch's ``(spk, mem)`` tuples and norse's
  ``(z, state)`` are unpacked by the adapter), the input current, and the gradient with respect to
  the spikes / the input current.
* Records are detached from the autograd graph unless ``keep_graph=True``.
* Hooks hold the monitor weakly: ``del monitor`` (and garbage collection) removes them, as do
  ``close()``, ``remove_hooks()`` and leaving a ``with`` block, also on an exception.
* Inside a Lyapunov estimate the twin trajectory's rows are dropped: records hold the nominal batch.
* Monitors that read membranes ask multi-step neurons to keep every step's membrane while they
  are attached (spikingjelly: ``store_v_seq``, restored on removal); a multi-step neuron that
  returns only its last step's membrane is skipped with a warning saying how to record it, never
  read as if it were a sequence.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._checks import user_stacklevel
from .context import active_rows, nominal_rows
from .neurons import InstanceSpec, Layer, NeuronRegistry, find_layers


def _identity(x):
    return x


def _unpack_len1(x):
    return x[0] if isinstance(x, tuple) and len(x) == 1 else x


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class BaseMonitor:
    """Shared machinery: the monitored layers, records, enable flag and hook lifetime."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *, keep_graph: bool = False,
                 registry: Optional[NeuronRegistry] = None):
        if not isinstance(keep_graph, bool):
            raise TypeError(f"keep_graph: expected True or False, got {keep_graph!r}")
        self.hooks: List[Any] = []
        self.records: List[Any] = []
        self.name_records_index: Dict[str, List[int]] = {}
        self._enable = True
        self.keep_graph = keep_graph
        self._layers: List[Layer] = find_layers(net, instance, registry)
        self.monitored_layers: List[str] = [layer.name for layer in self._layers]
        self.name_records_index.update((name, []) for name in self.monitored_layers)
        # the finalizer holds the handle list, never the monitor: collecting the monitor removes hooks
        self._finalizer = weakref.finalize(self, _remove_handles, self.hooks)

    # --- spikingjelly API -------------------------------------------------------------------
    def __getitem__(self, i):
        if isinstance(i, int):
            return self.records[i]
        if isinstance(i, str):
            if i not in self.name_records_index:
                raise KeyError(f"layer name: {i!r} is not monitored; monitored: {self.monitored_layers}")
            return [self.records[k] for k in self.name_records_index[i]]
        raise TypeError(f"index: expected an int or a layer name, got {type(i).__name__}")

    def clear_recorded_data(self) -> None:
        self.records.clear()
        for indices in self.name_records_index.values():
            indices.clear()

    def enable(self) -> None:
        self._enable = True

    def disable(self) -> None:
        self._enable = False

    def is_enable(self) -> bool:
        return self._enable

    def remove_hooks(self) -> None:
        _remove_handles(self.hooks)

    def close(self) -> None:
        """Stop recording and remove all hooks; records are kept."""
        self.disable()
        self.remove_hooks()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # --- internals ----------------------------------------------------------------------------
    def _record(self, name: str, value) -> None:
        self.name_records_index[name].append(len(self.records))
        self.records.append(value)

    def _prepare(self, x):
        return _detached(x) if not self.keep_graph else x

    def _hook(self, method: Callable, layer: Layer) -> Callable:
        """A hook that calls ``method(layer, *hook_args)`` on the monitor while it is alive and enabled."""
        ref = weakref.ref(self)

        def hook(module, *args):
            monitor = ref()
            if monitor is not None and monitor._enable:
                return method(monitor, layer, *args)
            return None
        return hook

    def _add(self, handle) -> None:
        self.hooks.append(handle)

    def _keep_membrane_steps(self) -> None:
        """Make multi-step neurons keep every step's membrane until the hooks are removed."""
        self._warned_membrane: set = set()
        for layer in self._layers:
            if layer.adapter is not None:
                handle = layer.adapter.record_membrane_steps(layer.module)
                if handle is not None:
                    self._add(handle)  # removed (the switch restored) with the hooks

    def _membrane(self, layer: Layer, output) -> Optional[Tuple[torch.Tensor, bool]]:
        """``(membrane, multistep)`` of a neuron call, twin rows dropped; None when the neuron
        exposes none, or only the last step of a multi-step call (warned once per layer)."""
        v = layer.adapter.membrane(layer.module, output)
        if not isinstance(v, torch.Tensor):
            return None
        multi = bool(layer.adapter.multistep(layer.module, output))
        if multi and v.dim() != layer.adapter.spikes(layer.module, output).dim():
            if layer.name not in self._warned_membrane:
                self._warned_membrane.add(layer.name)
                warnings.warn(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) is multi-step but exposes "
                    f"only its last step's membrane {tuple(v.shape)}: its membrane is not recorded "
                    f"({layer.adapter.membrane_steps_hint} to record every step)",
                    RuntimeWarning, stacklevel=user_stacklevel())
            return None
        return nominal_rows(v, time_first=multi), multi


def _check_callable(f, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name}: expected a function, got {type(f).__name__} {f!r}")


def multistep(layer: Layer, output) -> Optional[bool]:
    """Whether the layer's tensors are time-first ``(T, B, ...)``; None when it is no neuron."""
    return bool(layer.adapter.multistep(layer.module, output)) if layer.adapter else None


def membrane_time_first(layer: Layer, output, membrane: torch.Tensor) -> bool:
    """A multi-step neuron's membrane is a sequence (spikingjelly's ``v_seq``) when it has the
    spikes' rank, else its last step (``v``)."""
    spikes = layer.adapter.spikes(layer.module, output)
    return bool(layer.adapter.multistep(layer.module, output)) and membrane.dim() == spikes.dim()


class OutputMonitor(BaseMonitor):
    """Records ``function_on_output(spikes)`` of each monitored neuron (its raw output otherwise)."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None,
                 function_on_output: Callable = _identity, *, keep_graph: bool = False,
                 registry: Optional[NeuronRegistry] = None):
        _check_callable(function_on_output, "function_on_output")
        super().__init__(net, instance, keep_graph=keep_graph, registry=registry)
        self.function_on_output = function_on_output
        for layer in self._layers:
            self._add(layer.module.register_forward_hook(self._hook(OutputMonitor._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        value = layer.adapter.spikes(layer.module, output) if layer.adapter else _unpack_len1(output)
        self._record(layer.name, self.function_on_output(self._prepare(
            nominal_rows(value, time_first=multistep(layer, output)))))


class InputMonitor(BaseMonitor):
    """Records ``function_on_input(x)`` of the input of each monitored module before it runs
    (for neurons: the input current, the first argument)."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None,
                 function_on_input: Callable = _identity, *, keep_graph: bool = False,
                 registry: Optional[NeuronRegistry] = None):
        _check_callable(function_on_input, "function_on_input")
        super().__init__(net, instance, keep_graph=keep_graph, registry=registry)
        self.function_on_input = function_on_input
        for layer in self._layers:
            self._add(layer.module.register_forward_pre_hook(self._hook(InputMonitor._on_input, layer)))

    def _on_input(self, layer: Layer, inputs) -> None:
        value = inputs[0] if layer.adapter and inputs else _unpack_len1(inputs)
        self._record(layer.name, self.function_on_input(self._prepare(
            nominal_rows(value, time_first=multistep(layer, None)))))


class AttributeMonitor(BaseMonitor):
    """Records ``function_on_attribute(m.<attribute_name>)`` before (``pre_forward=True``) or after
    each forward of every monitored module ``m``. A missing attribute raises AttributeError naming
    the layer (at the first forward where it is still missing)."""

    def __init__(self, attribute_name: str, pre_forward: bool, net: nn.Module,
                 instance: InstanceSpec = None, function_on_attribute: Callable = _identity, *,
                 keep_graph: bool = False, registry: Optional[NeuronRegistry] = None):
        if not isinstance(attribute_name, str) or not attribute_name:
            raise ValueError(f"attribute_name: expected a non-empty string, got {attribute_name!r}")
        _check_callable(function_on_attribute, "function_on_attribute")
        super().__init__(net, instance, keep_graph=keep_graph, registry=registry)
        self.attribute_name, self.pre_forward = attribute_name, bool(pre_forward)
        self.function_on_attribute = function_on_attribute
        for layer in self._layers:
            hook = self._hook(AttributeMonitor._on_attribute, layer)
            register = layer.module.register_forward_pre_hook if pre_forward else layer.module.register_forward_hook
            self._add(register(hook))

    def _on_attribute(self, layer: Layer, *_args) -> None:
        if not hasattr(layer.module, self.attribute_name):
            raise AttributeError(
                f"AttributeMonitor: layer {layer.name!r} ({type(layer.module).__name__}) has no "
                f"attribute {self.attribute_name!r}")
        value = getattr(layer.module, self.attribute_name)
        self._record(layer.name, self.function_on_attribute(self._prepare(nominal_rows(value))))


class _GradMonitor(BaseMonitor):
    """Gradient monitors. In the forward (pre-)hook, a hook is put on the tensor whose gradient is
    wanted (a neuron's spikes, or its input current); it fires during backward, in backward order.

    Tensor hooks instead of module full-backward hooks: no extra autograd function per call (much
    cheaper per time step), and the twin layout of the forward is known in the hook's closure, so
    gradients of Lyapunov twin rows are dropped. The gradient is the total one reaching that
    tensor (the same as the module's own when, as usual, the tensor feeds only that module).
    """

    def __init__(self, net, instance, function, keep_graph, registry, on_input: bool,
                 own_hooks: bool = True):
        _check_callable(function, "function_on_grad_output" if not on_input else "function_on_grad_input")
        super().__init__(net, instance, keep_graph=keep_graph, registry=registry)
        self.function = function
        for layer in self._layers if own_hooks else ():  # else a caller's hook calls _watch_input
            if on_input:
                self._add(layer.module.register_forward_pre_hook(self._hook(_GradMonitor._watch_input, layer)))
            else:
                self._add(layer.module.register_forward_hook(self._hook(_GradMonitor._watch_output, layer)))

    def _watch_input(self, layer: Layer, inputs) -> None:
        self._watch(layer, inputs[0] if layer.adapter and inputs else _unpack_len1(inputs),
                    multistep(layer, None))

    def _watch_output(self, layer: Layer, inputs, output) -> None:
        self._watch(layer, layer.adapter.spikes(layer.module, output) if layer.adapter else _unpack_len1(output),
                    multistep(layer, output))

    def _watch(self, layer: Layer, tensor, time_first: Optional[bool] = None) -> None:
        if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad):
            return
        rows, ref = active_rows(), weakref.ref(self)

        def on_grad(grad):
            monitor = ref()
            if monitor is not None and monitor._enable:
                monitor._on_grad(layer.name, nominal_rows(grad, rows, time_first))
        tensor.register_hook(on_grad)

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        self._record(name, self.function(self._prepare(grad)))


class GradOutputMonitor(_GradMonitor):
    """Records ``function_on_grad_output(dL/dY)``: for neurons, the gradient with respect to the
    spikes. Records arrive in backward order (last layer first)."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None,
                 function_on_grad_output: Callable = _identity, *, keep_graph: bool = False,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, function_on_grad_output, keep_graph, registry, on_input=False)
        self.function_on_grad_output = function_on_grad_output


class GradInputMonitor(_GradMonitor):
    """Records ``function_on_grad_input(dL/dX)``: for neurons, the gradient with respect to the
    input current. Records arrive in backward order (last layer first)."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None,
                 function_on_grad_input: Callable = _identity, *, keep_graph: bool = False,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, function_on_grad_input, keep_graph, registry, on_input=True)
        self.function_on_grad_input = function_on_grad_input
