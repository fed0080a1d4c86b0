"""SpikeProfiler: per-layer pathology detection (seed 003's API), fed by hand or by hooks.

    profiler = SpikeProfiler()
    profiler.record_step("hidden", spikes_hidden, voltages=v_hidden)   # torch or numpy
    report = profiler.report()
    print(report.summary())

or, with no manual recording at all, ``SpikeProfiler().attach(model)``: every spiking neuron is
recorded through hooks (spikes and membranes on forward, the layer gradient norm on backward: per
backward pass, the norm of the gradient reaching each neuron's input current, as defined in
:mod:`stablespike.stats`). Statistics are the streaming accumulators of :mod:`stablespike.stats`
(rates averaged over time steps and samples, never summed over the batch); decisions are the rules
of :mod:`stablespike.rules`; rendering is in :mod:`stablespike.report`.

Layouts for ``record_step``: ``(N,)`` one sample, ``(B, N)`` one time step, ``(T, B, N)`` T time
steps; other ranks need ``multistep=True/False``. Spikes may be bool, integer or floating; they
are checked once per layer: spikes that are not 0/1 there are counted from then on as a spike
where > 0, with a warning naming the layer. NaN or inf in spikes, voltages or gradients is a
CRITICAL ``non_finite`` finding naming the layer and the first step (backward pass, for
gradients) that carried it.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .distributed import merge_across_ranks, should_sync
from ._checks import user_stacklevel
from .context import nominal_rows
from .monitor import BaseMonitor
from .neurons import InstanceSpec, Layer, NeuronRegistry
from .rules import (Pathology, Severity, Thresholds, activity_rules, gradient_explosion, gradient_vanishing,
                    non_finite)
from .stats import FiringRate, GradNorm, MembraneStats, Reduce
from .streaming import LayerGradNorms

# health score factors (see ProfileReport.health_score)
_LAYER_FACTOR = {Severity.CRITICAL: 0.0, Severity.WARNING: 0.75, Severity.INFO: 1.0}
_NETWORK_FACTOR = {Severity.CRITICAL: 0.5, Severity.WARNING: 0.75, Severity.INFO: 1.0}
_NETWORK_CATEGORIES = frozenset({"gradient_vanishing"})


@dataclass
class LayerStats:
    """Per-layer figures of a report. ``firing_rates`` is a numpy array, one rate per neuron."""

    name: str
    n_neurons: int
    firing_rates: np.ndarray
    dead_neuron_count: int
    dead_neuron_fraction: float
    saturated_neuron_fraction: float
    steps: int
    voltage_mean: float = math.nan
    voltage_std: float = math.nan
    voltage_steps: int = 0
    grad_norm_mean: float = math.nan
    grad_norm_max: float = math.nan

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "firing_rates"}
        d["firing_rate_mean"] = float(self.firing_rates.mean())
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass
class ProfileReport:
    """What the profiler found: ``layer_stats`` (by layer, in recording order), ``pathologies``,
    ``health_score`` (100 = nothing found, 0 = a dead network; see the property)."""

    layer_stats: Dict[str, LayerStats]
    pathologies: List[Pathology]
    thresholds: Thresholds = field(repr=False)

    @property
    def has_critical(self) -> bool:
        return any(p.severity is Severity.CRITICAL for p in self.pathologies)

    @property
    def health_score(self) -> float:
        """100 x the mean over recorded layers of each layer's health x the network's factor.

        A layer's health is 1, x 0.75 per WARNING on it, 0 with a CRITICAL finding (silent, mostly
        dead, exploding gradient). Findings about the whole network (vanishing gradient across
        depth, or on a name that is no recorded layer) multiply the mean: x 0.5 per CRITICAL,
        x 0.75 per WARNING. So the score does not fall with depth alone: 14 layers with a few dead
        neurons each score 75, a silent network 0.
        """
        layers = {name: 1.0 for name in self.layer_stats}
        network = 1.0
        for p in self.pathologies:
            if p.category in _NETWORK_CATEGORIES or p.layer not in layers:
                network *= _NETWORK_FACTOR[p.severity]
            else:
                layers[p.layer] *= _LAYER_FACTOR[p.severity]
        mean = sum(layers.values()) / len(layers) if layers else 1.0
        return 100.0 * mean * network

    def summary(self) -> str:
        from .report import profile_summary
        return profile_summary(self)

    def to_dict(self) -> dict:
        return {"health_score": self.health_score, "has_critical": self.has_critical,
                "pathologies": [p.to_dict() for p in self.pathologies],
                "layers": {n: s.to_dict() for n, s in self.layer_stats.items()},
                "thresholds": dict(self.thresholds.__dict__)}

    def to_json(self, path: Optional[str] = None) -> str:
        import json
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_html(self, path: Optional[str] = None) -> str:
        """A self-contained HTML page (firing-rate histograms and gradient-by-depth plots embedded
        as PNG); written to ``path`` when given."""
        from .report import profile_html
        return profile_html(self, path)


class _LayerRecord:
    """The accumulators of one layer."""

    def __init__(self):
        self.rate = FiringRate()
        self.membrane = MembraneStats(extremes=False)  # the rules read mean and std only
        self.grad = GradNorm()
        self.voltage_steps = 0
        self.binary: Optional[bool] = None  # spikes checked once: None until the first record

    def sync(self, reduce: Reduce) -> "_LayerRecord":
        """All ranks' shares of the same steps (see :meth:`merge`), through collectives."""
        self.rate.sync(reduce)
        self.membrane.sync(reduce)
        self.grad.sync(reduce)
        self.voltage_steps = int(reduce(torch.tensor(float(self.voltage_steps), dtype=torch.float64), "max"))
        return self

    def merge(self, other: "_LayerRecord") -> "_LayerRecord":
        """Another share of the same steps (another rank's samples): counts add up; the number
        of recorded voltage steps is the longest of the two, since the steps are the same."""
        self.rate.merge(other.rate)
        self.membrane.merge(other.membrane)
        self.grad.merge(other.grad)
        self.voltage_steps = max(self.voltage_steps, other.voltage_steps)
        return self


class SpikeProfiler:
    """Records spiking layers and reports pathologies with severities and fixes.

    ``thresholds`` (a :class:`~stablespike.rules.Thresholds`) or keyword overrides of its fields,
    e.g. ``SpikeProfiler(dead_rate=0.02)``; every rule uses them.
    """

    def __init__(self, thresholds: Optional[Thresholds] = None, **overrides):
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds: expected a Thresholds or None, got {type(thresholds).__name__}")
        self.thresholds = (thresholds or Thresholds()).replace(**overrides)
        self._layers: Dict[str, _LayerRecord] = {}
        self._monitors: List[BaseMonitor] = []

    # --- recording -------------------------------------------------------------------------------
    def record_step(self, layer: str, spikes, voltages=None, gradients=None, *,
                    multistep: Optional[bool] = None) -> None:
        """Record one step (or ``T`` steps) of ``layer``; torch tensors or numpy arrays."""
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected a layer name (str), got {type(layer).__name__} {layer!r}")
        if multistep is not None and not isinstance(multistep, bool):
            raise TypeError(f"multistep: expected True, False or None, got {multistep!r}")
        spikes = _as_tensor(spikes, "spikes", layer)
        multi = _multistep(spikes, multistep, layer)
        v = g = None
        if voltages is not None:
            v = _as_tensor(voltages, "voltages", layer)
            v = v.unsqueeze(0) if v.dim() == 1 else v
        if gradients is not None:
            g = _as_tensor(gradients, "gradients", layer)
        rec = self._layers.get(layer) or self._layers.setdefault(layer, _LayerRecord())
        if spikes.dim() == 1:
            spikes = spikes.unsqueeze(0)
        spikes = self._binary(rec, spikes, layer)
        _guard(lambda: rec.rate.update(spikes, multi), layer)
        if v is not None:
            _guard(lambda: rec.membrane.update(v, multi), layer)
            rec.voltage_steps += v.shape[0] if multi else 1
        if g is not None:
            _guard(lambda: rec.grad.update(g), layer)

    def _binary(self, rec: _LayerRecord, spikes: torch.Tensor, layer: str) -> torch.Tensor:
        """Spikes to count: checked once per layer (bool and integer 0/1 pass as they are, since
        the accumulators count any dtype exactly); a layer whose first spikes are not 0/1 is
        counted as ``spikes > 0`` from then on, with one warning."""
        if rec.binary is None:
            if spikes.is_complex():
                raise TypeError(f"spikes of layer {layer!r}: expected bool, integer or floating values, "
                                f"got dtype {spikes.dtype}")
            finite = spikes[torch.isfinite(spikes)] if spikes.is_floating_point() else spikes
            rec.binary = spikes.dtype == torch.bool or bool(((finite == 0) | (finite == 1)).all())
            if not rec.binary:
                warnings.warn(f"spikes of layer {layer!r} are not 0/1; values > 0 count as one spike",
                              RuntimeWarning, stacklevel=user_stacklevel())
        if rec.binary:
            return spikes
        counted = (spikes > 0).float()
        if spikes.is_floating_point():  # keep NaN / inf visible to the non-finite check
            counted = torch.where(torch.isfinite(spikes), counted, spikes.float())
        return counted

    def attach(self, model: nn.Module, instance: InstanceSpec = None, *,
               registry: Optional[NeuronRegistry] = None, grad_every: int = 1) -> "SpikeProfiler":
        """Record every spiking neuron of ``model`` through hooks until :meth:`detach`.

        Spikes and membranes are recorded at every time step (multi-step spikingjelly neurons
        keep ``v_seq`` while attached; a multi-step neuron exposing only its last membrane is
        skipped with a warning). The layer gradient norm (per backward pass, see
        :mod:`stablespike.stats`) is measured at every step; ``grad_every=k > 1`` measures every
        k-th step of a pass and scales the pass's sum of squares to all its steps, an estimate
        of the same quantity at about 1/k of the cost.
        """
        if isinstance(grad_every, bool) or not isinstance(grad_every, int) or grad_every < 1:
            raise ValueError(f"grad_every: expected an integer >= 1, got {grad_every!r}")
        grads = LayerGradNorms(model, instance, registry, self._add_grad_norm, grad_every, own_hooks=False)
        self._monitors.append(_ProfilerHooks(self, model, instance, registry, grads))
        self._monitors.append(grads)
        return self

    def detach(self) -> None:
        self._flush_passes()
        for monitor in self._monitors:
            monitor.close()
        self._monitors.clear()

    def _flush_passes(self) -> None:
        for monitor in self._monitors:  # the backward pass still summed in the gradient hooks
            if isinstance(monitor, LayerGradNorms):
                monitor.flush()

    def _add_grad_norm(self, name: str, norm: torch.Tensor) -> None:
        self._layers.setdefault(name, _LayerRecord()).grad.add_norm(norm)

    close = detach

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def reset(self) -> None:
        """Forget everything recorded (hooks stay attached)."""
        self._layers.clear()

    def pause(self) -> None:
        """Stop recording (e.g. during validation) until :meth:`resume`; hooks stay attached."""
        for monitor in self._monitors:
            monitor.disable()

    def resume(self) -> None:
        for monitor in self._monitors:
            monitor.enable()

    def absorb(self, other: "SpikeProfiler") -> None:
        """Add the records of ``other`` (this process's, e.g. a logging window's) to this
        profiler's, as steps that followed the ones recorded here: spike counts, membrane
        moments, gradient norms and recorded steps add up; ``other`` is left as it was."""
        if not isinstance(other, SpikeProfiler):
            raise TypeError(f"other: expected a SpikeProfiler, got {type(other).__name__}")
        other._flush_passes()
        for name, rec in other._layers.items():
            if name not in self._layers:
                self._layers[name] = copy.deepcopy(rec)
                continue
            mine = self._layers[name]
            steps = mine.voltage_steps + rec.voltage_steps
            mine.merge(rec).voltage_steps = steps

    # --- reporting -------------------------------------------------------------------------------
    def report(self, sync: Optional[bool] = None) -> ProfileReport:
        """Statistics and pathologies of everything recorded so far. ``sync``: merge all ranks'
        records first (a collective: every rank calls it); by default under torchrun with more
        than one rank, so that the report covers the whole data, not one rank's share."""
        self._flush_passes()
        layers = merge_across_ranks(self._layers) if should_sync(sync) else self._layers
        th, stats, found = self.thresholds, {}, []
        for name, rec in layers.items():
            if not rec.rate.has_data():
                continue
            stats[name] = s = _layer_stats(name, rec, th)
            found += activity_rules(name, s.firing_rates, s.voltage_std, s.voltage_steps, th)
        found += _non_finite(layers)
        found += self._gradient_pathologies(layers)
        return ProfileReport(stats, found, th)

    def _gradient_pathologies(self, layers: Dict[str, _LayerRecord]) -> List[Pathology]:
        with_grads = [(n, r.grad) for n, r in layers.items() if r.grad.has_data()]
        if not with_grads:
            return []
        found = []
        for name, g in with_grads:  # over time, per layer: layers differ in scale by design
            g.compute()  # folds pending norms into g.recent
            found.append(gradient_explosion(list(g.recent), self.thresholds, layer=name))
        if len(with_grads) >= 2:
            (first, g0), (last, g1) = with_grads[0], with_grads[-1]
            found.append(gradient_vanishing(first, g0.compute()["mean"], last, g1.compute()["mean"],
                                            self.thresholds))
        return [p for p in found if p is not None]


def _non_finite(layers: Dict[str, "_LayerRecord"]) -> List[Pathology]:
    """One CRITICAL finding per layer and quantity that carried NaN / inf, with its first step."""
    found = []
    for name, rec in layers.items():
        for what, acc, unit in (("spikes", rec.rate, "time step"), ("membrane", rec.membrane, "time step"),
                                ("gradient", rec.grad, "backward pass")):
            acc._flush()
            if math.isfinite(acc.first_nonfinite):
                found.append(non_finite(name, what, int(acc.first_nonfinite), unit))
    return found


def _layer_stats(name: str, rec: _LayerRecord, th: Thresholds) -> LayerStats:
    rates = rec.rate.compute().cpu().numpy().reshape(-1)
    dead = int((rates < th.dead_rate).sum())
    s = LayerStats(name, rates.size, rates, dead, dead / rates.size,
                   float((rates > th.saturated_rate).mean()), rec.rate.count)
    if rec.membrane.has_data():
        m = rec.membrane.compute()
        s.voltage_mean = float(m["mean"].mean())
        # pooled std over neurons and steps: sqrt(mean within-neuron variance + variance of means)
        s.voltage_std = float(torch.sqrt((m["std"] ** 2).mean() + m["mean"].var(unbiased=False)))
        s.voltage_steps = rec.voltage_steps
    if rec.grad.has_data():
        g = rec.grad.compute()
        s.grad_norm_mean, s.grad_norm_max = g["mean"], g["max"]
    return s


def _as_tensor(x, what: str, layer) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} of layer {layer!r}: expected a torch tensor or numpy array, "
                        f"got {type(x).__name__}") from err


def _multistep(x: torch.Tensor, multistep: Optional[bool], layer) -> bool:
    if multistep is not None:
        return bool(multistep)
    if x.dim() in (1, 2):
        return False
    if x.dim() == 3:
        return True  # (T, B, N)
    raise ValueError(f"spikes of layer {layer!r}: a {x.dim()}-D tensor is ambiguous; pass "
                     "multistep=True for (T, B, ...) or multistep=False for (B, ...)")


def _guard(update, layer) -> None:
    try:
        update()
    except ValueError as err:
        raise ValueError(f"layer {layer!r}: {err}") from None


class _ProfilerHooks(BaseMonitor):
    """Forward hooks feeding a profiler: spikes and membranes of every monitored neuron, reduced
    in the hook while they are still in cache (a few in-place operations per step)."""

    def __init__(self, profiler: SpikeProfiler, net, instance, registry, grads: LayerGradNorms):
        super().__init__(net, instance, registry=registry)
        self.profiler, self.grads = profiler, grads
        for layer in self._layers:
            if layer.adapter is None:
                raise ValueError(f"instance: the profiler needs spiking neurons; layer {layer.name!r} "
                                 f"({type(layer.module).__name__}) is not one")
        self._keep_membrane_steps()
        for layer in self._layers:
            self._add(layer.module.register_forward_hook(self._hook(_ProfilerHooks._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        # the gradient hook goes on the input current here: one module hook per step, not two
        self.grads.watch_step(layer, inputs)
        rec = self.profiler._layers.get(layer.name) or self.profiler._layers.setdefault(layer.name, _LayerRecord())
        multi = layer.adapter.multistep(layer.module, output)
        rec.rate.update(nominal_rows(layer.adapter.spikes(layer.module, output), time_first=multi), multi)
        found = self._membrane(layer, output)
        if found is not None:
            v, multi = found
            rec.membrane.update(v, multi)
            rec.voltage_steps += v.shape[0] if multi else 1
