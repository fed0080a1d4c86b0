"""Data-driven initialization: make every neuron layer fire at a target rate before training.

The commonest reason a deep SNN does not learn is that its deep layers are silent at
initialization (no spikes, so no surrogate gradient reaches the early layers). ``calibrate``
walks the layers from the input and, on a calibration batch, rescales each layer's incoming
current (the weights and bias of the module that feeds it: Linear, Conv, or the BatchNorm after a
conv) until the layer's mean firing rate is within ``tolerance`` of ``target_rate`` (LSUV-style, a
bracketing then bisection search in log-scale), or, with ``mode="threshold"``, rescales the
neuron's threshold instead. ``fluctuation_init`` sets the same scale in one shot from the input
current's statistics, so that a Gaussian membrane crosses threshold at the target rate (in the
spirit of fluctuation-driven initialization, Rossbroich, Gygax & Zenke 2022).

Both run without gradients, with dropout off, leave the model in the mode they found it in, and
restore batch-norm running statistics (calibration forwards must not train them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .neurons import decay_of, find_layers, scale_threshold, threshold_of
from .streaming import FiringRateMonitor

Forward = Callable[[nn.Module, torch.Tensor], object]


@dataclass
class LayerCalibration:
    layer: str
    rate_before: float
    rate_after: float
    scale: float
    evaluations: int
    converged: bool


@dataclass
class CalibrationReport:
    """Per-layer firing rate before and after, the scale applied, and whether it converged."""

    target_rate: float
    tolerance: float
    layers: List[LayerCalibration] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"calibration to rate {self.target_rate:g} +- {self.tolerance:g}",
                 f"{'layer':<20} {'before':>8} {'after':>8} {'scale':>9} {'evals':>6}  ok"]
        for r in self.layers:
            lines.append(f"{r.layer:<20} {r.rate_before:8.4f} {r.rate_after:8.4f} {r.scale:9.3g} "
                         f"{r.evaluations:6d}  {'yes' if r.converged else 'NO'}")
        return "\n".join(lines)


def _check(target_rate: float, tolerance: float, x) -> None:
    if not 0.0 < float(target_rate) < 1.0:
        raise ValueError(f"target_rate: expected a rate in (0, 1), got {target_rate!r}")
    if not 0.0 < float(tolerance) < min(target_rate, 1 - target_rate):
        raise ValueError(f"tolerance: expected a number in (0, {min(target_rate, 1 - target_rate):g}), "
                         f"got {tolerance!r}")
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty calibration batch, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _default_forward(model: nn.Module, x: torch.Tensor):
    return model(x)


class _Session:
    """Runs calibration forwards: no grad, dropout off, batch-norm statistics restored at the end."""

    def __init__(self, model: nn.Module, x: torch.Tensor, forward: Forward):
        self.model, self.x, self.forward = model, x, forward
        self.modes = {m: m.training for m in model.modules()}
        # running statistics only: the affine parameters are what calibration changes
        self.bn_state = {m: {k: v.clone() for k, v in m.named_buffers()}
                         for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()

    def rates(self) -> Dict[str, float]:
        with FiringRateMonitor(self.model) as monitor, torch.no_grad():
            self.forward(self.model, self.x)
        # this process's batch only: calibration is local, also under torchrun (callable on one rank)
        return {row["layer"]: row["mean"] for row in monitor.table(sync=False)}

    def close(self) -> None:
        with torch.no_grad():
            for m, buffers in self.bn_state.items():
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)
        for m, mode in self.modes.items():
            m.training = mode


def _incoming(model: nn.Module, x: torch.Tensor, forward: Forward, neurons) -> Dict[str, nn.Module]:
    """For each neuron layer, the module whose output is its input current (traced on one forward;
    tensors are matched by identity while the trace keeps them alive)."""
    produced, wanted, hooks = [], {}, []
    weighted = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                and not any(m is layer.module for layer in neurons)]

    def on_output(mod, args, out):  # hooks must return None: a value would replace the output
        produced.append((out, mod))

    def on_input(name):
        def hook(mod, args):
            if args and name not in wanted:
                wanted[name] = args[0]
        return hook

    for m in weighted:
        hooks.append(m.register_forward_hook(on_output))
    for layer in neurons:
        hooks.append(layer.module.register_forward_pre_hook(on_input(layer.name)))
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    found = {}
    for layer in neurons:
        current = wanted.get(layer.name)
        module = next((mod for out, mod in produced if out is current), None)
        if module is None:
            raise ValueError(f"model: cannot tell which module feeds neuron layer {layer.name!r} "
                             "(its input is not the output of a Linear, Conv or BatchNorm module)")
        found[layer.name] = module
    return found


@torch.no_grad()
def _scale_current(module: nn.Module, factor: float) -> None:
    module.weight.mul_(factor)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(factor)


def calibrate(model: nn.Module, x: torch.Tensor, *, target_rate: float = 0.1, tolerance: float = 0.02,
              mode: str = "weights", max_evaluations: int = 40,
              forward: Optional[Forward] = None) -> CalibrationReport:
    """Rescale layer by layer until every neuron layer fires at ``target_rate`` (+- ``tolerance``)
    on the calibration batch ``x`` (whatever ``forward(model, x)`` takes; default ``model(x)``)."""
    _check(target_rate, tolerance, x)
    if mode not in ("weights", "threshold"):
        raise ValueError(f"mode: expected 'weights' or 'threshold', got {mode!r}")
    forward = forward or _default_forward
    neurons = find_layers(model)
    session = _Session(model, x, forward)
    try:
        feeds = _incoming(model, x, forward, neurons) if mode == "weights" else {}
        before = session.rates()
        report = CalibrationReport(target_rate, tolerance)
        for layer in neurons:
            apply = ((lambda f, m=feeds.get(layer.name): _scale_current(m, f)) if mode == "weights"
                     else (lambda f, n=layer.module: scale_threshold(n, f)))
            # a larger current (or a lower threshold) makes a layer fire more
            sign = 1.0 if mode == "weights" else -1.0
            # aim at half the tolerance, so that a held-out batch stays within the tolerance
            scale, evals, rate = _search(lambda: session.rates()[layer.name], apply, sign,
                                         target_rate, tolerance / 2, max_evaluations)
            report.layers.append(LayerCalibration(layer.name, before[layer.name], rate, scale, evals,
                                                  abs(rate - target_rate) <= tolerance))
        return report
    finally:
        session.close()


def _search(measure, apply, sign, target, tol, budget):
    """Find a log-scale s with |rate(s) - target| <= tol: bracket by doubling, then bisect."""
    log_s, rate, evals = 0.0, measure(), 1
    lo = hi = None
    step = math.log(4.0)
    while abs(rate - target) > tol and evals < budget:
        if rate < target:
            lo = log_s
            new = log_s + step if hi is None else (log_s + hi) / 2
        else:
            hi = log_s
            new = log_s - step if lo is None else (log_s + lo) / 2
        apply(math.exp(sign * (new - log_s)))
        log_s = new
        rate, evals = measure(), evals + 1
    return math.exp(sign * log_s), evals, rate


def fluctuation_init(model: nn.Module, x: torch.Tensor, *, target_rate: float = 0.1,
                     forward: Optional[Forward] = None) -> CalibrationReport:
    """One-shot scale per layer from the statistics of its input current.

    For a leaky neuron with decay ``beta``, a current of per-step mean ``m`` and std ``s`` gives a
    membrane of mean ``m / (1 - beta)`` and std ``s / sqrt(1 - beta^2)`` (white-noise
    approximation). The layer's current is scaled so that a Gaussian membrane exceeds the
    threshold with probability ``target_rate``; layers are set in depth order, each from the input
    it receives after the layers before it were set. Resets make this approximate: the report
    shows the rates obtained.
    """
    _check(target_rate, min(target_rate, 1 - target_rate) / 2, x)
    forward = forward or _default_forward
    neurons = find_layers(model)
    session = _Session(model, x, forward)
    z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * target_rate)).item()  # Phi^-1(1 - rate)
    try:
        feeds = _incoming(model, x, forward, neurons)
        before = session.rates()
        report = CalibrationReport(target_rate, float("nan"))
        for layer in neurons:
            m, s = _current_stats(session, layer.module)
            beta = min(decay_of(layer.module), 0.999)  # an integrator (1) as a very slow leak
            mu_u, sigma_u = m / (1 - beta), s / math.sqrt(1 - beta ** 2)
            threshold = threshold_of(layer.module)
            reach = mu_u + z * sigma_u
            scale = threshold / reach if reach > 0 else 1.0
            _scale_current(feeds[layer.name], scale)
            report.layers.append(LayerCalibration(layer.name, before[layer.name], math.nan, scale, 1, False))
        after = session.rates()
        for row in report.layers:
            row.rate_after = after[row.layer]
            row.converged = abs(row.rate_after - target_rate) <= target_rate / 2
        return report
    finally:
        session.close()


def _current_stats(session: _Session, neuron: nn.Module):
    """Mean and std of the input current of ``neuron`` over its calls on the calibration batch."""
    seen = []

    def keep(mod, args):
        seen.append(args[0].detach().double())
    handle = neuron.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            session.forward(session.model, session.x)
    finally:
        handle.remove()
    current = torch.stack(seen)
    return float(current.mean()), float(current.std())


class ThresholdBalancer:
    """Homeostatic thresholds during training (off unless you use it): after each batch, every
    neuron layer's threshold moves toward the value that gives ``target_rate``,
    ``threshold *= exp(rate_gain * (rate - target_rate))`` with ``rate`` the layer's mean firing
    rate over the batch (a layer firing too much raises its threshold, a silent one lowers it).

    ``balancer = ThresholdBalancer(model); ...; loss.backward(); opt.step(); balancer.step()``,
    or ``fit(model, data, config, callbacks=[ThresholdBalancer(model)])``.
    Thresholds stay within ``[min_threshold, max_threshold]``. Rates depend steeply on thresholds:
    a ``rate_gain`` much above 5 makes them oscillate.
    """

    def __init__(self, model: nn.Module, target_rate: float = 0.1, rate_gain: float = 2.0,
                 min_threshold: float = 1e-3, max_threshold: float = 1e3):
        if not 0.0 < float(target_rate) < 1.0:
            raise ValueError(f"target_rate: expected a rate in (0, 1), got {target_rate!r}")
        if not rate_gain > 0:
            raise ValueError(f"rate_gain: expected a positive number, got {rate_gain!r}")
        self.target_rate, self.rate_gain = float(target_rate), float(rate_gain)
        self.bounds = (float(min_threshold), float(max_threshold))
        self.monitor = FiringRateMonitor(model)
        self.neurons = {layer.name: layer.module for layer in self.monitor._layers}

    @torch.no_grad()
    def step(self) -> Dict[str, float]:
        """Apply one update from the rates seen since the last step; returns the new thresholds.
        Under torchrun the rates are merged over all ranks (call it on every rank), so that every
        rank's thresholds stay the same."""
        new = {}
        for row in self.monitor.table():
            factor = math.exp(self.rate_gain * (row["mean"] - self.target_rate))
            new[row["layer"]] = scale_threshold(self.neurons[row["layer"]], factor, self.bounds)
        self.monitor.reset()
        return new

    def close(self) -> None:
        self.monitor.close()

    # the training-callback protocol of stablespike.train.fit: fit(..., callbacks=[balancer])
    def on_train_begin(self, model: nn.Module) -> None:
        pass

    def on_batch_end(self, step: int, model: nn.Module, loss=None, lyapunov=None) -> None:
        self.step()

    def on_train_end(self) -> None:
        self.close()
