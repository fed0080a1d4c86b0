"""Pathologies as data: the rule table of seed 003 (per layer) and the stability rules of seed 000.

Each rule is a row (category, the threshold fields it reads, message, suggestion) and a check that
returns a :class:`Pathology` or None. The thresholds live in one :class:`Thresholds` object that
the profiler and the stability monitor share, and every rule reads them (seed 003's profiler took
threshold arguments and ignored them). A rule's message quotes the numbers it decided on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace as _replace
from enum import Enum
from typing import List, Optional, Sequence

import numpy as np


class Severity(Enum):
    INFO = "INFO"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True)
class Pathology:
    """One finding: ``severity`` (``.value`` is the text), ``category``, ``layer``, ``message``
    (quoting the measured numbers) and ``suggestion`` (the fix to try)."""

    severity: Severity
    category: str
    layer: str
    message: str
    suggestion: str

    def to_dict(self) -> dict:
        return {"severity": self.severity.value, "category": self.category, "layer": self.layer,
                "message": self.message, "suggestion": self.suggestion}


@dataclass
class Thresholds:
    """Every threshold of every rule (defaults: seed 003's table and seed 000's diagnosis), the
    one place they are defined: the profiler, the stability monitor and the depth benchmark read
    the same object. Each field is checked when it is set (ValueError naming it)."""

    dead_rate: float = 0.01          # a neuron firing below this is dead
    dead_warning: float = 0.10       # fraction of dead neurons for a WARNING
    dead_critical: float = 0.50      # ... and for CRITICAL
    saturated_rate: float = 0.95     # a neuron firing above this is saturated
    saturated_warning: float = 0.30  # fraction of saturated neurons for a WARNING
    silent_max_rate: float = 0.001   # a layer whose fastest neuron fires below this is silent
    voltage_std: float = 1e-6        # membrane std below this is a voltage collapse ...
    voltage_min_steps: int = 10      # ... judged only with more than this many recorded steps
    explosion_ratio: float = 100.0   # largest layer gradient norm / median one
    vanishing_ratio: float = 100.0   # last layer's mean layer gradient norm / first layer's
    chaos: float = 0.5               # Lyapunov exponent above this: chaotic
    over_stable: float = -0.5        # ... below this: over-stable
    # effective gradient condition number (over the numerical rank; stability.effective_condition).
    # A healthy 64-wide first layer on digits measures ~1e5 (constant pixels, fast-decaying
    # spectrum); float32 gradients cannot resolve more than 1 / (max(M, N) eps).
    condition_warning: float = 1e6
    condition_critical: float = 1e8
    trend_ratio: float = 10.0        # recent / early mean parameter gradient norm for a trend

    def __setattr__(self, name: str, value) -> None:
        check = _CHECKS.get(name)
        if check is not None:
            value = check(name, value)
        object.__setattr__(self, name, value)

    def replace(self, **changes) -> "Thresholds":
        """A copy with ``changes`` applied (each named field checked; an unknown name is a
        TypeError naming it)."""
        known = [f.name for f in fields(self)]
        for key in changes:
            if key not in known:
                raise TypeError(f"{key}: not a threshold; expected one of {known}")
        return _replace(self, **changes)


def _number(name: str, value, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _rate(name, value):
    return _number(name, value, 0.0, 1.0)


def _positive(name, value):
    return _number(name, value, 0.0, low_open=True)


def _steps(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return value


_CHECKS = {"dead_rate": _rate, "dead_warning": _rate, "dead_critical": _rate,
           "saturated_rate": _rate, "saturated_warning": _rate, "silent_max_rate": _rate,
           "voltage_std": lambda n, v: _number(n, v, 0.0), "voltage_min_steps": _steps,
           "explosion_ratio": _positive, "vanishing_ratio": _positive, "chaos": _number,
           "over_stable": _number, "condition_warning": _positive, "condition_critical": _positive,
           "trend_ratio": _positive}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- per-layer activity rules (seed 003) ---------------------------------------------------------

def silent_layer(layer: str, rates: np.ndarray, th: Thresholds) -> Optional[Pathology]:
    top = float(np.max(rates))
    if top < th.silent_max_rate:
        return Pathology(Severity.CRITICAL, "silent_layer", layer,
                         f"no neuron fires: max rate {top:.2e} < {th.silent_max_rate:g} "
                         f"over {rates.size} neurons",
                         "check the input encoding and scale; lower all thresholds or use "
                         "data-driven initialization")
    return None


def dead_neurons(layer: str, rates: np.ndarray, th: Thresholds) -> Optional[Pathology]:
    frac = float(np.mean(rates < th.dead_rate))
    if frac <= th.dead_warning:
        return None
    severity = Severity.CRITICAL if frac > th.dead_critical else Severity.WARNING
    return Pathology(severity, "dead_neurons", layer,
                     f"{_pct(frac)} of {rates.size} neurons fire below {th.dead_rate:g} "
                     f"(limit {_pct(th.dead_critical if severity is Severity.CRITICAL else th.dead_warning)})",
                     "lower the threshold, add input noise, or rescale this layer's weights")


def saturated_neurons(layer: str, rates: np.ndarray, th: Thresholds) -> Optional[Pathology]:
    frac = float(np.mean(rates > th.saturated_rate))
    if frac <= th.saturated_warning:
        return None
    return Pathology(Severity.WARNING, "saturated_neurons", layer,
                     f"{_pct(frac)} of {rates.size} neurons fire above {th.saturated_rate:g} "
                     f"(limit {_pct(th.saturated_warning)})",
                     "raise the threshold or reduce the input current (weight scale)")


def voltage_collapse(layer: str, voltage_std: float, steps: int, th: Thresholds) -> Optional[Pathology]:
    if steps <= th.voltage_min_steps or not voltage_std < th.voltage_std:
        return None
    return Pathology(Severity.WARNING, "voltage_collapse", layer,
                     f"membrane std {voltage_std:.2e} < {th.voltage_std:g} over {steps} steps",
                     "increase the input current; check that the layer receives input")


def activity_rules(layer: str, rates: np.ndarray, voltage_std: float, voltage_steps: int,
                   th: Thresholds) -> List[Pathology]:
    """The per-layer rules. A silent layer is reported once, as silent: not also as dead, nor as a
    voltage collapse (a layer that receives nothing has a flat membrane for the same reason)."""
    silent = silent_layer(layer, rates, th)
    if silent:
        return [silent]
    found = [dead_neurons(layer, rates, th), saturated_neurons(layer, rates, th),
             voltage_collapse(layer, voltage_std, voltage_steps, th)]
    return [p for p in found if p is not None]


def non_finite(layer: str, what: str, step: int, unit: str = "time step") -> Pathology:
    """NaN or inf in a layer's ``what`` (spikes, membrane, gradient), first at ``step``."""
    return Pathology(Severity.CRITICAL, "non_finite", layer,
                     f"NaN/inf in the {what} of {layer!r}, first at {unit} {step}",
                     "check for NaN weights or inputs, a learning rate that diverged, or a "
                     "division by zero; clip gradients and lower the learning rate")


# --- gradient rules ------------------------------------------------------------------------------

def gradient_explosion(norms: Sequence[float], th: Thresholds, layer: str = "(network)") -> Optional[Pathology]:
    """Largest recorded gradient norm over the *median* one: unlike max/mean (which cannot exceed
    the number of records), this can reach 100x with three records."""
    norms = [n for n in norms if math.isfinite(n)]
    if len(norms) < 3:
        return None
    median = float(np.median(norms))
    if not median > 0:
        return None  # most records carry no gradient at all: vanishing, not explosion
    ratio = max(norms) / median
    if ratio <= th.explosion_ratio:
        return None
    return Pathology(Severity.CRITICAL, "gradient_explosion", layer,
                     f"largest gradient norm {max(norms):.3g} is {ratio:.3g}x the median {median:.3g} "
                     f"(limit {th.explosion_ratio:g}x)",
                     "clip gradients, lower the learning rate, or add the Lyapunov penalty")


def gradient_vanishing(first: str, first_norm: float, last: str, last_norm: float,
                       th: Thresholds) -> Optional[Pathology]:
    """The last layer's mean gradient norm over the first layer's (gradients flow last to first)."""
    if not (last_norm > 0 and math.isfinite(first_norm)):
        return None
    ratio = last_norm / first_norm if first_norm > 0 else math.inf
    if ratio <= th.vanishing_ratio:
        return None
    return Pathology(Severity.CRITICAL, "gradient_vanishing", first,
                     f"gradient norm at {first!r} is {first_norm:.3g}, {ratio:.3g}x smaller than at "
                     f"{last!r} ({last_norm:.3g}; limit {th.vanishing_ratio:g}x)",
                     "add skip connections, widen the surrogate (smaller slope), or use "
                     "data-driven initialization so that deep layers fire")


def condition_number(cond: Optional[float], th: Thresholds) -> Optional[Pathology]:
    """``cond``: the *effective* gradient condition number (largest singular value over the
    smallest one within the numerical rank; see ``stability.effective_condition``), never the
    raw largest / (smallest + 1e-12), which is huge for every rank-deficient weight gradient."""
    if cond is None or not cond > th.condition_warning:
        return None
    severity = Severity.CRITICAL if cond > th.condition_critical else Severity.WARNING
    limit = th.condition_critical if severity is Severity.CRITICAL else th.condition_warning
    return Pathology(severity, "ill_conditioned_gradients", "(network)",
                     f"effective gradient condition number {cond:.2e} > {limit:.0e}",
                     "lower the learning rate, normalize layers, or regularize the dynamics")


# --- dynamics rules (seed 000) -------------------------------------------------------------------

def lyapunov_regime(value: float, th: Thresholds) -> Pathology:
    """Always returns the regime: CRITICAL chaotic, WARNING over-stable, INFO edge of chaos."""
    if value > th.chaos:
        return Pathology(Severity.CRITICAL, "chaotic_dynamics", "(network)",
                         f"Lyapunov exponent {value:.4f} > {th.chaos:g}: trajectories diverge quickly",
                         "increase lambda_reg or decrease the learning rate")
    if value < th.over_stable:
        return Pathology(Severity.WARNING, "over_stable_dynamics", "(network)",
                         f"Lyapunov exponent {value:.4f} < {th.over_stable:g}: trajectories collapse",
                         "may lose expressiveness: consider reducing the regularization")
    return Pathology(Severity.INFO, "edge_of_chaos", "(network)",
                     f"Lyapunov exponent {value:.4f} within [{th.over_stable:g}, {th.chaos:g}]: "
                     "edge of chaos (good for learning)", "none needed")


def gradient_trend(history: Sequence[float], th: Thresholds, window: int = 10) -> Optional[Pathology]:
    """Mean of the last ``window`` gradient norms against the first ``window``."""
    if len(history) < window:
        return None
    recent, early = float(np.mean(history[-window:])), float(np.mean(history[:window]))
    ratio = recent / (early + 1e-8)
    if ratio > th.trend_ratio:
        return Pathology(Severity.WARNING, "exploding_gradient_trend", "(network)",
                         f"gradient norm grew {ratio:.3g}x ({early:.3g} -> {recent:.3g})",
                         "clip gradients or lower the learning rate")
    if ratio < 1.0 / th.trend_ratio:
        return Pathology(Severity.WARNING, "vanishing_gradient_trend", "(network)",
                         f"gradient norm shrank to {ratio:.3g}x ({early:.3g} -> {recent:.3g})",
                         "check for dying layers; consider data-driven initialization")
    return None
