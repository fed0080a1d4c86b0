"""Data-driven initialization: make every neuron layer fire at a target rate before training.

The commonest reason a deep SNN does not learn is that its deep layers are silent at
initialization (no spikes, so no surrogate gradient reaches the early layers). ``calibrate``
walks the layers from the input and, on a calibration batch, rescales each layer's incoming
current (the weights and bias of the module that feeds it: Linear, Conv, or the BatchNorm after a
conv, found through max/avg pooling, flatten, identity, dropout and ReLU, which commute with a
positive scale) until the layer's mean firing rate is within ``tolerance`` of ``target_rate``
(LSUV-style, a bracketing then bisection search in log-scale), or, with ``mode="threshold"``,
rescales the neuron's threshold instead. ``fluctuation_init`` sets the same scale in one shot from
the input current's statistics, so that a Gaussian membrane crosses threshold at the target rate
(in the spirit of fluctuation-driven initialization, Rossbroich, Gygax & Zenke 2022).

Both run without gradients, with dropout off, leave the model in the mode they found it in, and
restore batch-norm running statistics (calibration forwards must not train them). Rates are
measured through ``forward(model, x)``, which must run the model over time exactly as training
does: a default ``model(x)`` that calls a single-step neuron once (one time step), or a forward
whose rates change from one call to the next (state carried over), is refused with an error
that says how to write ``forward``.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules import dropout, pooling

from ._checks import check_tensor, describe
from .neurons import Layer, decay_of, find_layers, scale_threshold, threshold_of
from .streaming import FiringRateMonitor

Forward = Callable[[nn.Module, torch.Tensor], object]

#: Default bound on every scale calibration applies: weights (or thresholds) are multiplied by a
#: factor in ``[1 / MAX_SCALE, MAX_SCALE]``, never more (a deep layer of a default-initialized
#: MLP needs about x2-x50).
MAX_SCALE = 1e3

# Modules f with f(a * z) = a * f(z) for every a > 0: a scale on the current before them is the
# same scale after them, so the module that feeds a neuron may sit behind them.
_HOMOGENEOUS = (pooling._MaxPoolNd, pooling._AvgPoolNd, pooling._AdaptiveMaxPoolNd,
                pooling._AdaptiveAvgPoolNd, pooling._LPPoolNd, nn.Flatten, nn.Unflatten, nn.Identity,
                dropout._DropoutNd, nn.ReLU, nn.LeakyReLU, nn.PReLU)


@dataclass
class LayerCalibration:
    """One neuron layer: its rate before and after (measured through the same forward), the
    scale applied (of the incoming weights, or of the threshold in threshold mode; 1 when the
    layer was left as found), the forwards its search took, whether it is within the tolerance,
    and, for a layer left as found, why."""

    layer: str
    rate_before: float
    rate_after: float
    scale: float
    evaluations: int
    converged: bool
    reason: str = ""

    @property
    def restored(self) -> bool:
        return bool(self.reason)


@dataclass
class CalibrationReport:
    """Per-layer firing rate before and after, the scale applied, whether it converged, and the
    layers left as found (``left_alone``: layer -> reason)."""

    target_rate: float
    tolerance: float
    layers: List[LayerCalibration] = field(default_factory=list)
    mode: str = "weights"

    @property
    def left_alone(self) -> Dict[str, str]:
        return {r.layer: r.reason for r in self.layers if r.restored}

    def __str__(self) -> str:
        # fluctuation_init sets each layer's scale once from its statistics: no tolerance
        within = "" if math.isnan(self.tolerance) else f" +- {self.tolerance:g}"
        lines = [f"calibration ({self.mode}) to rate {self.target_rate:g}{within}",
                 f"{'layer':<20} {'before':>8} {'after':>8} {'scale':>9} {'evals':>6}  ok"]
        for r in self.layers:
            lines.append(f"{r.layer:<20} {r.rate_before:8.4f} {r.rate_after:8.4f} {r.scale:9.3g} "
                         f"{r.evaluations:6d}  {'yes' if r.converged else 'NO'}")
        for name, reason in self.left_alone.items():
            lines.append(f"left as found: {name}: {reason}")
        return "\n".join(lines)


def _number(value, name: str, lo: float, hi: float, *, closed_hi: bool = False) -> float:
    """A real number (not a bool, not a string) in (lo, hi), or (lo, hi] with ``closed_hi``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and lo < float(value) and (
        float(value) <= hi if closed_hi else float(value) < hi)
    if not ok:
        raise ValueError(f"{name}: expected a number in ({lo:g}, {hi:g}{']' if closed_hi else ')'}, "
                         f"got {describe(value)}")
    return float(value)


def _check(model, x, target_rate, forward) -> float:
    """Check the arguments shared by calibrate and fluctuation_init; returns the target rate."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {describe(model)}")
    target = _number(target_rate, "target_rate", 0.0, 1.0)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward: expected a function forward(model, x), got {describe(forward)}")
    check_tensor(x, "x", ndims=range(1, 9), layout="calibration batch (as forward(model, x) takes it)")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point calibration batch, got {describe(x)}")
    return target


def _neuron_layers(model: nn.Module) -> List[Layer]:
    """The neuron layers of ``model``; the error names the argument ``model``."""
    try:
        return find_layers(model)
    except ValueError as err:
        raise ValueError(f"model: {str(err).removeprefix('net: ')}") from None


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
            if isinstance(m, dropout._DropoutNd):
                m.eval()

    def rates(self, pre_hooks: Optional[Dict[nn.Module, Callable]] = None) -> Dict[str, float]:
        """Mean rate per neuron layer over one forward; ``pre_hooks``: forward pre-hooks to attach
        for this forward only."""
        handles = [m.register_forward_pre_hook(h) for m, h in (pre_hooks or {}).items()]
        try:
            with FiringRateMonitor(self.model) as monitor, torch.no_grad():
                self.forward(self.model, self.x)
        finally:
            for h in handles:
                h.remove()
        # this process's batch only: calibration is local, also under torchrun (callable on one rank)
        return {row["layer"]: row["mean"] for row in monitor.table(sync=False)}

    def close(self) -> None:
        with torch.no_grad():
            for m, buffers in self.bn_state.items():
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)
        for m, mode in self.modes.items():
            m.training = mode


@dataclass
class _Trace:
    """One traced forward: per neuron layer, its calls, whether its output is multi-step, its
    first input current and its mean rate; ``links``: (output, module, input) of every weighted
    or positively homogeneous module, in call order (tensors matched by identity while alive)."""

    calls: Counter
    multistep: Dict[str, bool]
    inputs: Dict[str, torch.Tensor]
    rates: Dict[str, float]
    links: list


def _trace(session: _Session, layers: List[Layer]) -> _Trace:
    neurons = {layer.module for layer in layers}
    trace = _Trace(Counter(), {}, {}, {}, [])

    def on_link(mod, args, out):  # hooks must return None: a value would replace the output
        trace.links.append((out, mod, args[0] if args else None))

    def on_call(name):
        def hook(mod, args):
            trace.calls[name] += 1
            if args and name not in trace.inputs:
                trace.inputs[name] = args[0]
        return hook

    def on_output(layer):
        def hook(mod, args, out):
            trace.multistep[layer.name] = bool(layer.adapter.multistep(mod, out))
        return hook

    hooks = {m: on_link for m in session.model.modules()
             if m not in neurons and (isinstance(m, _HOMOGENEOUS) or _weighted(m))}
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    handles += [layer.module.register_forward_hook(on_output(layer)) for layer in layers]
    try:
        trace.rates = session.rates({layer.module: on_call(layer.name) for layer in layers})
    finally:
        for h in handles:
            h.remove()
    return trace


def _weighted(module: nn.Module) -> bool:
    """A module whose output scales with its ``weight`` (and ``bias``): Linear, Conv, BatchNorm..."""
    return isinstance(getattr(module, "weight", None), torch.Tensor) and not isinstance(module, _HOMOGENEOUS)


def _feeds(trace: _Trace, layers: List[Layer]) -> Dict[str, nn.Module]:
    """For each neuron layer, the weighted module whose output is its input current, followed
    back through positively homogeneous modules (pooling, flatten, ReLU...)."""
    found = {}
    for layer in layers:
        current, end, module = trace.inputs.get(layer.name), len(trace.links), None
        while current is not None and module is None:
            # the latest module before `end` that produced this tensor (an in-place ReLU or an
            # Identity returns its input: following its input must look earlier, never at itself)
            end = next((i for i in range(end - 1, -1, -1) if trace.links[i][0] is current), None)
            if end is None:
                break
            _, mod, current = trace.links[end]
            module = mod if _weighted(mod) else None
        if module is None:
            raise ValueError(f"model: cannot tell which module feeds neuron layer {layer.name!r} (its input "
                             "is not the output of a module with weights, such as Linear, Conv or "
                             "BatchNorm, alone or followed by pooling, flatten, identity, dropout or "
                             "ReLU); calibrate its threshold instead with mode='threshold'")
        found[layer.name] = module
    return found


def _time_loop_example(layer: Layer) -> str:
    """A one-line time loop for the framework of ``layer`` (x: (T, B, ...))."""
    framework = getattr(layer.adapter, "framework", "")
    if framework == "snntorch":
        return ("`def forward(net, x): utils.reset(net); return [net(x_t) for x_t in x]` "
                "(with `from snntorch import utils`)")
    if framework == "norse":
        return "`forward=lambda net, x, s=None: [(s := net(x_t, s)[1]) for x_t in x]` (the state carried)"
    if framework == "spikingjelly":
        return ("`def forward(net, x): functional.reset_net(net); return [net(x_t) for x_t in x]` "
                "(with `from spikingjelly.activation_based import functional`), or step_mode='m'")
    return "`def forward(net, x): return [net(x_t) for x_t in x]`, resetting the neuron state first"


def _check_runs_over_time(trace: _Trace, layers: List[Layer], x: torch.Tensor) -> None:
    """The default forward ``model(x)`` must run the model over time: a single-step neuron called
    once is one time step, and its rate is not the rate of the model in its time loop."""
    for layer in layers:
        if trace.calls[layer.name] == 1 and not trace.multistep.get(layer.name, False):
            raise ValueError(
                f"forward: model(x) calls neuron layer {layer.name!r} ({type(layer.module).__name__}) "
                f"once, on x of shape {tuple(x.shape)}: a single time step, so the rates measured would "
                "not be the model's. Pass x with a leading time axis (T, B, ...) and forward=, a "
                f"function that runs the model over it from a fresh state, e.g. {_time_loop_example(layer)}")


def _check_repeatable(session: _Session, first: Dict[str, float], tolerance: float) -> Dict[str, float]:
    """Run the forward on zeros, then on x again: the rates must be ``first`` (within a quarter of
    the tolerance). A forward that carries the neuron state over from one call to the next fails
    this even where two runs on x in a row agree (a carried state in a steady regime), since the
    run on zeros leaves a different state behind. Returns the second rates."""
    with torch.no_grad():
        session.forward(session.model, torch.zeros_like(session.x))
    second = session.rates()
    for name, rate in first.items():
        if abs(second.get(name, rate) - rate) > tolerance / 4:
            raise ValueError(
                f"forward: two runs on the same batch with the same weights gave different rates "
                f"(layer {name!r}: {rate:.4g}, then {second[name]:.4g}, with a run on zeros between "
                "them): the neuron state carries over from one call to the next, or the forward draws "
                "random numbers. Reset the state at the start of forward (snnTorch: "
                "snntorch.utils.reset(net), which misses deep copies: call reset_mem() on each of their "
                "neurons; spikingjelly: functional.reset_net(net)) and encode x once, before calibrating")
    return second


def _weights_knob(module: nn.Module) -> Callable[[float], None]:
    """``set(log_s)``: the module's weight and bias as found times ``exp(log_s)``; ``set(0)``
    restores them exactly."""
    found = [(p, p.detach().clone()) for p in (module.weight, getattr(module, "bias", None))
             if isinstance(p, torch.Tensor)]

    @torch.no_grad()
    def set_log(log_s: float) -> None:
        for p, p0 in found:
            p.copy_(p0 * math.exp(log_s))
    return set_log


def _threshold_knob(layer: Layer) -> Callable[[float], None]:
    """``set(log_s)``: the threshold as found times ``exp(-log_s)`` (more drive, lower threshold);
    ``set(0)`` restores it exactly."""
    threshold_of(layer.module)  # raises the error that names what is missing
    value = layer.adapter.threshold(layer.module)
    if layer.adapter.set_threshold is None:
        raise ValueError(f"mode: layer {layer.name!r} ({type(layer.module).__name__}) has no settable "
                         "threshold; use mode='weights'")
    found = value.detach().clone() if isinstance(value, torch.Tensor) else float(value)
    return lambda log_s: layer.adapter.set_threshold(layer.module, found * math.exp(-log_s))


@dataclass
class _Outcome:
    log_s: float
    rate: float
    evaluations: int
    lo: Optional[tuple]  # (log_s, rate) with the rate below the target
    hi: Optional[tuple]  # (log_s, rate) with the rate above the target


def _search(measure, set_log, target: float, tol: float, budget: int, bound: float) -> _Outcome:
    """Find a log-scale s in [-bound, bound] with |rate(s) - target| <= tol (the rate grows with
    s): bracket by steps of x4, then bisect."""
    log_s, rate, evals = 0.0, measure(), 1
    lo = hi = None
    step = math.log(4.0)
    while abs(rate - target) > tol and evals < budget:
        if rate < target:
            lo = (log_s, rate)
            if hi is None and log_s >= bound:
                break  # the largest scale allowed is not enough
            new = min(log_s + step, bound) if hi is None else (log_s + hi[0]) / 2
        else:
            hi = (log_s, rate)
            if lo is None and log_s <= -bound:
                break  # the smallest scale allowed is still too much
            new = max(log_s - step, -bound) if lo is None else (log_s + lo[0]) / 2
        set_log(new)
        log_s = new
        rate, evals = measure(), evals + 1
    return _Outcome(log_s, rate, evals, lo, hi)


def _has_recurrence(neuron: nn.Module) -> bool:
    """A weight matrix inside the neuron module is a recurrent connection (snnTorch RLeaky /
    RSynaptic, norse recurrent cells)."""
    return any(p.dim() >= 2 for p in neuron.parameters())


def _why(session: _Session, layer: Layer, out: _Outcome, target: float, tol: float, bound: float,
         mode: str) -> str:
    """Why the search for ``layer`` failed, with the numbers; run after the layer was restored."""
    knob = "incoming weights" if mode == "weights" else "threshold"
    sign = 1.0 if mode == "weights" else -1.0

    def scale(log_s):
        return math.exp(sign * log_s)
    if out.lo is not None and out.hi is not None:
        (ls_lo, r_lo), (ls_hi, r_hi) = out.lo, out.hi
        return (f"no scale of its {knob} gives {target:g} +- {tol:g} within {out.evaluations} forwards: the "
                f"rate jumps from {r_lo:.3g} (x{scale(ls_lo):.4g}) to {r_hi:.3g} (x{scale(ls_hi):.4g})")
    if abs(out.log_s) < bound:
        return (f"no scale found within max_evaluations={out.evaluations} forwards (rate {out.rate:.3g} "
                f"with its {knob} at x{scale(out.log_s):.4g})")
    seen = {}

    def probe(zero: bool):  # a pre-hook: the largest input current seen; zero: replaced by zeros
        def hook(mod, args):
            if args and isinstance(args[0], torch.Tensor):
                seen["max"] = max(seen.get("max", 0.0), float(args[0].detach().abs().max()))
                return (torch.zeros_like(args[0]),) + tuple(args[1:]) if zero else None
            return None
        return hook
    idle = session.rates({layer.module: probe(zero=out.rate > target)}).get(layer.name, math.nan)
    if out.rate > target and "max" in seen and idle > target + tol:
        drive = "recurrent drive" if _has_recurrence(layer.module) else "driven by its own state or parameters"
        return f"fires at {idle:.3g} with zero input: {drive}"
    if out.rate < target and seen.get("max") == 0.0 and mode == "weights":
        return "its input current is zero at every step (nothing reaches it: are the layers before it silent?)"
    return (f"fires at {out.rate:.3g} with its {knob} at x{scale(out.log_s):g}, the bound of the search "
            f"(max_scale)")


def calibrate(model: nn.Module, x: torch.Tensor, *, target_rate: float = 0.1, tolerance: float = 0.02,
              mode: str = "weights", max_evaluations: int = 40, max_scale: float = MAX_SCALE,
              forward: Optional[Forward] = None) -> CalibrationReport:
    """Rescale layer by layer, from the input, until every neuron layer fires at ``target_rate``
    (+- ``tolerance``) on the calibration batch ``x``.

    ``x``: whatever ``forward(model, x)`` takes, a float tensor, e.g. ``(T, B, ...)`` for a time
    loop. ``forward`` must run the model over time from a fresh state, as training does; by default
    ``model(x)``, which is refused when it calls a single-step neuron only once (one time step: pass
    ``forward=``). Either way two forwards must give the same rates (reset the state in ``forward``).

    ``mode="weights"``: the weight and bias of the module feeding each layer (Linear, Conv,
    BatchNorm, ..., possibly behind pooling, flatten, identity, dropout or ReLU) are multiplied by a
    scale in ``[1 / max_scale, max_scale]``; ``mode="threshold"``: the neuron's threshold is, by a
    factor in the same range. Each layer's search takes at most ``max_evaluations`` forwards.

    A layer that cannot be brought within the tolerance (it fires from its recurrence alone, its
    input is silent, the bound is reached, the rate jumps over the target) is restored exactly as
    found and listed in ``report.left_alone`` with the reason. ``rate_after`` is measured through
    ``forward`` once every layer is done.
    """
    target = _check(model, x, target_rate, forward)
    tolerance = _number(tolerance, "tolerance", 0.0, min(target, 1 - target))
    if mode not in ("weights", "threshold"):
        raise ValueError(f"mode: expected 'weights' or 'threshold', got {describe(mode)}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 2:
        raise ValueError(f"max_evaluations: expected an integer >= 2, got {describe(max_evaluations)}")
    bound = math.log(_number(max_scale, "max_scale", 1.0, math.inf))
    layers = _neuron_layers(model)
    session = _Session(model, x, forward or _default_forward)
    undo: List[Callable[[float], None]] = []  # every knob touched: set(0) restores it exactly
    try:
        before, feeds = _prepare(session, layers, forward is None, tolerance, mode == "weights")
        # thresholds are read (and checked) before any layer changes
        knobs = {layer.name: _threshold_knob(layer) for layer in layers} if mode == "threshold" else {}
        report = CalibrationReport(target, tolerance, mode=mode)
        fed = {}  # feeding module -> the layer it was calibrated for
        for layer in layers:
            report.layers.append(_calibrate_layer(session, layer, feeds.get(layer.name), knobs.get(layer.name),
                                                  fed, before, target, tolerance, max_evaluations, bound,
                                                  undo))
        after = _final_rates(session, tolerance)
        for row in report.layers:
            row.rate_after = after.get(row.layer, math.nan)
            row.converged = not row.restored and abs(row.rate_after - target) <= tolerance
        return report
    except BaseException:  # an error or an interrupt half-way: the model as found
        _restore(undo)
        raise
    finally:
        session.close()


def _restore(undo: List[Callable[[float], None]]) -> None:
    """Every knob touched set back as found, the latest first (a module touched twice ends as found)."""
    for set_log in reversed(undo):
        set_log(0.0)


def _prepare(session: _Session, layers: List[Layer], default_forward: bool, tolerance: float,
             weights: bool):
    """Trace one forward and check it: rates before, and the module feeding each layer."""
    trace = _trace(session, layers)
    if default_forward:
        _check_runs_over_time(trace, layers, session.x)
    _check_repeatable(session, trace.rates, tolerance)
    return trace.rates, (_feeds(trace, layers) if weights else {})


def _calibrate_layer(session, layer, feed, threshold_knob, fed, before, target, tolerance, budget, bound,
                     undo) -> LayerCalibration:
    """Search one layer's scale (its feeding module's weights, or ``threshold_knob``); restore the
    layer and say why when it cannot reach the target."""
    row = LayerCalibration(layer.name, before.get(layer.name, math.nan), math.nan, 1.0, 0, False)
    if layer.name not in before:
        row.reason = "forward(model, x) never calls it"
        return row
    if feed is not None and feed in fed:
        row.reason = f"its input comes from the module that feeds layer {fed[feed]!r}, already calibrated"
        return row
    mode = "threshold" if threshold_knob is not None else "weights"
    set_log = threshold_knob or _weights_knob(feed)
    undo.append(set_log)
    # aim at half the tolerance, so that a held-out batch stays within the tolerance
    out = _search(lambda: session.rates()[layer.name], set_log, target, tolerance / 2, budget, bound)
    row.evaluations = out.evaluations
    if abs(out.rate - target) <= tolerance:
        row.scale = math.exp(out.log_s if mode == "weights" else -out.log_s)
        if feed is not None:
            fed[feed] = layer.name
        return row
    set_log(0.0)  # never leave a layer worse than found
    row.reason = _why(session, layer, out, target, tolerance, bound, mode)
    return row


def _final_rates(session: _Session, tolerance: float) -> Dict[str, float]:
    """The rates after calibration, checked again as at the start: a forward that carries state
    from call to call (invisible at the start while the layers were silent) measured nothing
    real: the error is raised and the caller restores every layer."""
    return _check_repeatable(session, session.rates(), tolerance)


def fluctuation_init(model: nn.Module, x: torch.Tensor, *, target_rate: float = 0.1,
                     forward: Optional[Forward] = None) -> CalibrationReport:
    """One-shot scale per layer from the statistics of its input current.

    For a leaky neuron with decay ``beta``, a current of per-step mean ``m`` and std ``s`` gives a
    membrane of mean ``m / (1 - beta)`` and std ``s / sqrt(1 - beta^2)`` (white-noise
    approximation). The layer's current is scaled so that a Gaussian membrane exceeds the
    threshold with probability ``target_rate``; layers are set in depth order, each from the input
    it receives after the layers before it were set. The scale stays in ``[1 / MAX_SCALE,
    MAX_SCALE]``. Resets make this approximate: the report shows the rates obtained. ``x`` and
    ``forward`` as in :func:`calibrate` (the same checks of the forward).
    """
    target = _check(model, x, target_rate, forward)
    layers = _neuron_layers(model)
    session = _Session(model, x, forward or _default_forward)
    z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * target)).item()  # Phi^-1(1 - rate)
    undo: List[Callable[[float], None]] = []
    try:
        tolerance = min(target, 1 - target) / 2
        before, feeds = _prepare(session, layers, forward is None, tolerance, True)
        report = CalibrationReport(target, float("nan"), mode="fluctuation")
        for layer in layers:
            m, s = _current_stats(session, layer.module)
            beta = min(decay_of(layer.module), 0.999)  # an integrator (1) as a very slow leak
            mu_u, sigma_u = m / (1 - beta), s / math.sqrt(1 - beta ** 2)
            threshold = threshold_of(layer.module)
            reach = mu_u + z * sigma_u
            scale = min(max(threshold / reach, 1 / MAX_SCALE), MAX_SCALE) if reach > 0 else 1.0
            undo.append(_weights_knob(feeds[layer.name]))
            undo[-1](math.log(scale))
            report.layers.append(LayerCalibration(layer.name, before[layer.name], math.nan, scale, 1, False))
        after = _final_rates(session, tolerance)
        for row in report.layers:
            row.rate_after = after[row.layer]
            row.converged = abs(row.rate_after - target) <= target / 2
        return report
    except BaseException:  # an error or an interrupt half-way: the model as found
        _restore(undo)
        raise
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
