"""Monitors that feed streaming statistics instead of keeping records: O(neurons) memory.

``FiringRateMonitor(net)`` gives per-neuron firing rates and a per-layer table,
``MembraneMonitor(net)`` membrane mean/std/min/max, ``GradNormMonitor(net)`` the norm of the
gradient reaching each layer. They share the monitors' layer discovery and hook lifetime
(:class:`stablespike.monitor.BaseMonitor`) and the accumulators of :mod:`stablespike.stats`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .distributed import merge_across_ranks, should_sync
from .context import nominal_rows
from .monitor import BaseMonitor, _GradMonitor, _identity, membrane_time_first
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
        spikes = nominal_rows(layer.adapter.spikes(layer.module, output),
                              time_first=layer.adapter.multistep(layer.module, output))
        self.stats[layer.name].update(spikes, layer.adapter.multistep(layer.module, output))

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
    """Per-neuron membrane mean / std / min / max of every monitored neuron, on the fly."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, registry=registry)
        _neurons_only(self._layers, "MembraneMonitor")
        self.stats = {layer.name: MembraneStats() for layer in self._layers}
        for layer in self._layers:
            self._add(layer.module.register_forward_hook(self._hook(MembraneMonitor._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        membrane = layer.adapter.membrane(layer.module, output)
        if membrane is None:
            raise ValueError(
                f"MembraneMonitor: layer {layer.name!r} ({type(layer.module).__name__}) exposes no "
                "membrane potential in its output or attributes")
        rows = nominal_rows(membrane, time_first=membrane_time_first(layer, output, membrane))
        self.stats[layer.name].update(rows, layer.adapter.multistep(layer.module, output))


class GradNormMonitor(_StreamingMixin, _GradMonitor):
    """Norm of the gradient with respect to each monitored layer's output (for neurons, the
    spikes), per backward call: mean and max per layer, instead of a record per call."""

    def __init__(self, net: nn.Module, instance: InstanceSpec = None, *,
                 registry: Optional[NeuronRegistry] = None):
        super().__init__(net, instance, _identity, False, registry, on_input=False)
        self.stats = {layer.name: GradNorm() for layer in self._layers}

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:  # accumulate, keep no tensor
        self.stats[name].update(grad)
