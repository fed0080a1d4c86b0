"""SpikeProfiler: per-layer pathology detection (seed 003's API), fed by hand or by hooks.

    profiler = SpikeProfiler()
    profiler.record_step("hidden", spikes_hidden, voltages=v_hidden)   # torch or numpy
    report = profiler.report()
    print(report.summary())

or, with no manual recording at all, ``SpikeProfiler().attach(model)``: every spiking neuron is
recorded through hooks (spikes and membranes on forward, the surrogate gradient reaching each
neuron's input on backward). Statistics are the streaming accumulators of :mod:`stablespike.stats`
(rates averaged over time steps and samples, never summed over the batch); decisions are the rules
of :mod:`stablespike.rules`; rendering is in :mod:`stablespike.report`.

Layouts for ``record_step``: ``(N,)`` one sample, ``(B, N)`` one time step, ``(T, B, N)`` T time
steps; other ranks need ``multistep=True/False``. Spikes that are not 0/1 are counted as a spike
where > 0, with a warning naming the layer.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .distributed import merge_across_ranks, should_sync
from ._checks import user_stacklevel
from .context import nominal_rows
from .monitor import BaseMonitor, _GradMonitor, _identity, membrane_time_first
from .neurons import InstanceSpec, Layer, NeuronRegistry
from .rules import Pathology, Severity, Thresholds, activity_rules, gradient_explosion, gradient_vanishing
from .stats import FiringRate, GradNorm, MembraneStats

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
        self.warned_nonbinary = False

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
        self.thresholds = thresholds or Thresholds()
        for key, value in overrides.items():
            if not hasattr(self.thresholds, key):
                raise TypeError(f"{key}: not a threshold; expected one of {list(Thresholds().__dict__)}")
            setattr(self.thresholds, key, value)
        self._layers: Dict[str, _LayerRecord] = {}
        self._monitors: List[BaseMonitor] = []

    # --- recording -------------------------------------------------------------------------------
    def record_step(self, layer: str, spikes, voltages=None, gradients=None, *,
                    multistep: Optional[bool] = None) -> None:
        """Record one step (or ``T`` steps) of ``layer``; torch tensors or numpy arrays."""
        rec = self._layers.setdefault(str(layer), _LayerRecord())
        spikes = _as_tensor(spikes, "spikes", layer)
        multi = _multistep(spikes, multistep, layer)
        if spikes.dim() == 1:
            spikes = spikes.unsqueeze(0)
        spikes = self._binary(rec, spikes, layer)
        _guard(lambda: rec.rate.update(spikes, multi), layer)
        if voltages is not None:
            v = _as_tensor(voltages, "voltages", layer)
            if v.is_floating_point() and not torch.isfinite(v.sum()):
                raise ValueError(f"voltages of layer {layer!r}: expected finite values, got NaN/inf")
            v = v.unsqueeze(0) if v.dim() == 1 else v
            _guard(lambda: rec.membrane.update(v, multi), layer)
            rec.voltage_steps += v.shape[0] if multi else 1
        if gradients is not None:
            rec.grad.update(_as_tensor(gradients, "gradients", layer))

    def _binary(self, rec: _LayerRecord, spikes: torch.Tensor, layer: str) -> torch.Tensor:
        if spikes.dtype == torch.bool:
            return spikes.float()
        if not bool(((spikes == 0) | (spikes == 1)).all()):
            if not rec.warned_nonbinary:
                warnings.warn(f"spikes of layer {layer!r} are not 0/1; values > 0 count as one spike",
                              RuntimeWarning, stacklevel=user_stacklevel())
                rec.warned_nonbinary = True
            return (spikes > 0).float()
        return spikes if spikes.is_floating_point() else spikes.float()

    def attach(self, model: nn.Module, instance: InstanceSpec = None, *,
               registry: Optional[NeuronRegistry] = None, grad_every: int = 4) -> "SpikeProfiler":
        """Record every spiking neuron of ``model`` through hooks until :meth:`detach`.

        Spikes and membranes are recorded at every time step. The gradient reaching each
        neuron layer is measured at every ``grad_every``-th time step of a pass (steps 0,
        ``grad_every``, ...) and its squared norm scaled to all the steps of the pass: the rules
        compare norms across layers and passes, which a sample of steps estimates at a quarter
        of the cost (``grad_every=1`` measures every step).
        """
        if int(grad_every) != grad_every or grad_every < 1:
            raise ValueError(f"grad_every: expected an integer >= 1, got {grad_every!r}")
        grads = _ProfilerGradHooks(self, model, instance, registry, int(grad_every))
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
            if isinstance(monitor, _ProfilerGradHooks):
                monitor.flush()

    close = detach

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def reset(self) -> None:
        """Forget everything recorded (hooks stay attached)."""
        self._layers.clear()

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

    def __init__(self, profiler: SpikeProfiler, net, instance, registry, grads: "_ProfilerGradHooks"):
        super().__init__(net, instance, registry=registry)
        self.profiler, self.grads = profiler, grads
        for layer in self._layers:
            if layer.adapter is None:
                raise ValueError(f"instance: the profiler needs spiking neurons; layer {layer.name!r} "
                                 f"({type(layer.module).__name__}) is not one")
            self._add(layer.module.register_forward_hook(self._hook(_ProfilerHooks._on_output, layer)))

    def _on_output(self, layer: Layer, inputs, output) -> None:
        # the gradient hook goes on the input current here: one module hook per step, not two
        self.grads.watch_step(layer, inputs)
        rec = self.profiler._layers.get(layer.name) or self.profiler._layers.setdefault(layer.name, _LayerRecord())
        multi = layer.adapter.multistep(layer.module, output)
        rec.rate.update(nominal_rows(layer.adapter.spikes(layer.module, output), time_first=multi), multi)
        v = layer.adapter.membrane(layer.module, output)
        if v is not None:
            v = nominal_rows(v, time_first=membrane_time_first(layer, output, v))
            rec.membrane.update(v, multi)
            rec.voltage_steps += v.shape[0] if multi else 1


class _ProfilerGradHooks(_GradMonitor):
    """Gradient hooks feeding a profiler: the norm of the gradient reaching each neuron's input
    (after the surrogate derivative), one norm per layer and backward pass (summed in square over
    the time steps of the pass), so that the rules compare training steps, not time steps.
    Every ``every``-th step of a pass is measured; the pass's sum of squares is scaled by
    steps / measured steps."""

    def __init__(self, profiler: SpikeProfiler, net, instance, registry, every: int = 1):
        super().__init__(net, instance, _identity, False, registry, on_input=True, own_hooks=False)
        self.profiler, self.every = profiler, every
        self._pass_sq: Dict[str, list] = {}
        self._pass_steps: Dict[str, int] = {}
        ref = weakref.ref(self)

        def new_pass(module, args):  # a new forward of the net: the previous pass is complete
            hooks = ref()
            if hooks is not None:
                hooks.flush()
        self._add(net.register_forward_pre_hook(new_pass))

    def watch_step(self, layer: Layer, inputs) -> None:
        """Called by the forward hook at every step of ``layer``; watches every ``every``-th."""
        step = self._pass_steps.get(layer.name, 0)
        self._pass_steps[layer.name] = step + 1
        if step % self.every == 0:
            self._watch_input(layer, inputs)

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        self._pass_sq.setdefault(name, []).append(torch.dot(flat, flat))  # one BLAS call, no sync

    def flush(self) -> None:
        """Hand the finished pass's per-layer norms to the profiler."""
        for name, squares in self._pass_sq.items():
            steps = max(self._pass_steps.get(name, 0), len(squares))
            total = torch.stack(squares).to(torch.float64).sum() * (steps / len(squares))
            self.profiler._layers.setdefault(name, _LayerRecord()).grad.add_norm(total.sqrt())
        self._pass_sq, self._pass_steps = {}, {}
