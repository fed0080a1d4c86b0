"""Monitors that feed streaming statistics instead of keeping records: O(neurons) memory.

``FiringRateMonitor(net)`` gives per-neuron firing rates and a per-layer table,
``MembraneMonitor(net)`` membrane mean/std/min/max, ``GradNormMonitor(net)`` the layer gradient
norm (per backward pass, with respect to each layer's input current: the definition in
:mod:`stablespike.stats`, the same one the profiler records and its rules read). They share the monitors' layer discovery and hook lifetime
(:class:`stablespike.monitor.BaseMonitor`) and the accumulators of :mod:`stablespike.stats`.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .distributed import merge_across_ranks, should_sync
from .context import nominal_rows
from .monitor import BaseMonitor, _GradMonitor, _identity
from .neurons import InstanceSpec, Layer, NeuronRegistry
from .stats import FiringRate, GradNorm, MembraneStats


class _StreamingMixin:
    """Per-layer accumulators: ``stats[name]``; ``compute()``, ``reset()``, ``merge()``."""

    stats: Dict[str, object]

    def compute(self, sync: Optional[bool] = None) -> Dict[str, object]:
        """``{layer name: accumulator.compute()}`` for the layers that saw data.

        ``sync``: merge the accumulators of all ranks first (a collective: every rank calls it);
        by default when running under torchrun with more than one rank. This rank's own
        accumulators are left as they are.
        """
        stats = merge_across_ranks(self.stats) if should_sync(sync) else self.stats
        return {name: s.compute() for name, s in stats.items() if s.has_data()}

    def reset(self) -> None:
        for s in self.stats.values():
            s.reset()

    def merge(self, other: "_StreamingMixin"):
        """Add another monitor's accumulators (same layer names) into this one's."""
        missing = set(other.stats) - set(self.stats)
        if missing:
            raise ValueError(f"other: monitors layers this one does not: {sorted(missing)}")
        for name, s in other.stats.items():
            self.stats[name].merge(s)
        return self


def _neurons_only(layers: List[Layer], what: str) -> None:
    for layer in layers:
        if layer.adapter is None:
            raise ValueError(
                f"instance: {what} reads spiking neurons through their adapter; layer "
                f"{layer.name!r} ({type(layer.module).__name__}) is not a known neuron type "
                "(register it with stablespike.register_neuron)")


class FiringRateMonitor(_StreamingMixin, BaseMonitor):
    """Per-neuron firing rates of every monitored neuron, accumulated on the fly.

    A rate is spikes / (time steps x samples): single-step neurons count one step per call,
    multi-step neurons ``T`` steps per call.
    """

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, registry=registry)
        _neurons_only(self._layers, "FiringRateMonitor")
        self.stats = {layer.name: FiringRate() for layer in self._layers}
        for layer in self._layers:
            self._add(layer.module.register_forward_hook(self._hook(FiringRateMonitor._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        multi = layer.adapter.multistep(layer.module, output)
        spikes = nominal_rows(layer.adapter.spikes(layer.module, output), time_first=multi)
        self.stats[layer.name].update(spikes, multi)

    def rates(self, sync: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """``{layer name: per-neuron rates}`` (``sync`` as in :meth:`compute`)."""
        return self.compute(sync)

    def table(self, sync: Optional[bool] = None) -> List[Dict[str, float]]:
        """One row per layer: name, neurons, mean / min / max rate, fraction of silent neurons
        (``sync`` as in :meth:`compute`)."""
        rows = []
        for name, rate in self.compute(sync).items():
            rows.append({"layer": name, "neurons": rate.numel(), "mean": float(rate.mean()),
                         "min": float(rate.min()), "max": float(rate.max()),
                         "silent_fraction": float((rate == 0).double().mean())})
        return rows

    def __str__(self) -> str:  # this rank's table: printing must never wait on other ranks
        lines = [f"{'layer':<24} {'neurons':>8} {'mean rate':>10} {'min':>8} {'max':>8} {'silent':>7}"]
        for r in self.table(sync=False):
            lines.append(f"{r['layer']:<24} {r['neurons']:>8} {r['mean']:>10.4f} {r['min']:>8.4f} "
                         f"{r['max']:>8.4f} {r['silent_fraction']:>7.1%}")
        return "\n".join(lines)


class MembraneMonitor(_StreamingMixin, BaseMonitor):
    """Per-neuron membrane mean / std / min / max of every monitored neuron, on the fly, over
    every time step: multi-step spikingjelly neurons keep ``v_seq`` while monitored; a multi-step
    neuron that exposes only its last step (norse without ``record_states=True``) is skipped with
    a warning."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, registry=registry)
        _neurons_only(self._layers, "MembraneMonitor")
        self.stats = {layer.name: MembraneStats() for layer in self._layers}
        self._keep_membrane_steps()
        for layer in self._layers:
            self._add(layer.module.register_forward_hook(self._hook(MembraneMonitor._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        if not isinstance(layer.adapter.membrane(layer.module, output), torch.Tensor):
            raise ValueError(
                f"MembraneMonitor: layer {layer.name!r} ({type(layer.module).__name__}) exposes no "
                "membrane potential in its output or attributes")
        found = self._membrane(layer, output)
        if found is not None:
            self.stats[layer.name].update(*found)


class LayerGradNorms(_GradMonitor):
    """The layer gradient norm of every monitored layer (see :mod:`stablespike.stats`): per
    backward pass, ``sqrt(sum over the pass's time steps of |dL/dI_t|^2)`` with ``I_t`` the
    layer's input current (for a multi-step neuron, the whole ``(T, B, ...)`` input at once).

    ``sink(layer name, norm)`` receives one 0-dim tensor per layer and pass. A pass ends when
    the model runs forward again, or on :meth:`flush`. ``every > 1`` measures only every
    ``every``-th call of a layer in a pass and scales the pass's sum of squares by calls /
    measured calls: an estimate of the same quantity, cheaper by about that factor.
    ``own_hooks=False``: the caller's forward hook calls :meth:`watch_step` at every call.
    """

    def __init__(self, net: nn.Module, instance: InstanceSpec, registry: Optional[NeuronRegistry],
                 sink: Callable[[str, torch.Tensor], None], every: int = 1, own_hooks: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"grad_every: expected an integer >= 1, got {every!r}")
        super().__init__(net, instance, _identity, False, registry, on_input=True, own_hooks=False)
        self.sink, self.every = sink, every
        self._pass_sq: Dict[str, list] = {}
        self._pass_steps: Dict[str, int] = {}
        ref = weakref.ref(self)

        def new_pass(module, args):  # a new forward of the net: the previous pass is complete
            hooks = ref()
            if hooks is not None:
                hooks.flush()
        self._add(net.register_forward_pre_hook(new_pass))
        for layer in self._layers if own_hooks else ():
            self._add(layer.module.register_forward_pre_hook(self._hook(LayerGradNorms.watch_step, layer)))

    def watch_step(self, layer: Layer, inputs) -> None:
        """Called at every call of ``layer``; watches every ``every``-th one of the pass."""
        step = self._pass_steps.get(layer.name, 0)
        self._pass_steps[layer.name] = step + 1
        if step % self.every == 0:
            self._watch_input(layer, inputs)

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        self._pass_sq.setdefault(name, []).append(torch.dot(flat, flat))  # one BLAS call, no sync

    def flush(self) -> None:
        """Hand the finished pass's per-layer norms to the sink."""
        for name, squares in self._pass_sq.items():
            steps = max(self._pass_steps.get(name, 0), len(squares))
            total = torch.stack(squares).to(torch.float64).sum() * (steps / len(squares))
            self.sink(name, total.sqrt())
        self._pass_sq, self._pass_steps = {}, {}


class GradNormMonitor(_StreamingMixin, LayerGradNorms):
    """The layer gradient norm of each monitored layer (per backward pass, with respect to its
    input current; see :class:`LayerGradNorms`): mean and max per layer over the passes, instead
    of a record per call. The profiler records the same quantity."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *,
                 registry: Optional[NeuronRegistry] = None, grad_every: int = 1):
        self.stats: Dict[str, GradNorm] = {}
        super().__init__(net, instance, registry, self._add_norm, grad_every)
        self.stats = {layer.name: GradNorm() for layer in self._layers}

    def _add_norm(self, name: str, norm: torch.Tensor) -> None:
        self.stats[name].add_norm(norm)

    def compute(self, sync: Optional[bool] = None) -> Dict[str, object]:
        self.flush()  # the last backward pass
        return super().compute(sync)
