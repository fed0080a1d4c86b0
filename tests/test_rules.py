"""Each rule fires just past its threshold and stays quiet just below it; thresholds are used."""
import numpy as np
import pytest

from stablespike import Severity, Thresholds
from stablespike import rules

TH = Thresholds()


def rates_with(fraction: float, value: float, n: int = 1000, rest: float = 0.3) -> np.ndarray:
    r = np.full(n, rest)
    r[: int(round(fraction * n))] = value
    return r


def categories(found):
    return [(p.category, p.severity) for p in found]


def test_dead_neurons_warning_and_critical_edges():
    assert rules.dead_neurons("l", rates_with(0.10, 0.0), TH) is None  # exactly 10 %: quiet
    assert rules.dead_neurons("l", rates_with(0.101, 0.0), TH).severity is Severity.WARNING
    assert rules.dead_neurons("l", rates_with(0.50, 0.0), TH).severity is Severity.WARNING
    assert rules.dead_neurons("l", rates_with(0.501, 0.0), TH).severity is Severity.CRITICAL
    # the rate threshold itself: 0.0099 is dead, 0.0101 is not
    assert rules.dead_neurons("l", rates_with(0.2, 0.0099), TH) is not None
    assert rules.dead_neurons("l", rates_with(0.2, 0.0101), TH) is None


def test_saturated_neurons_edges():
    assert rules.saturated_neurons("l", rates_with(0.30, 0.99), TH) is None
    p = rules.saturated_neurons("l", rates_with(0.301, 0.99), TH)
    assert p.severity is Severity.WARNING and "30.1%" in p.message
    assert rules.saturated_neurons("l", rates_with(0.5, 0.949), TH) is None


def test_silent_layer_is_reported_once():
    silent = np.full(50, 0.0009)
    found = rules.activity_rules("l", silent, voltage_std=0.0, voltage_steps=100, th=TH)
    assert categories(found) == [("silent_layer", Severity.CRITICAL)]
    assert rules.silent_layer("l", np.full(50, 0.0011), TH) is None


def test_voltage_collapse_needs_recorded_steps():
    assert rules.voltage_collapse("l", 9e-7, 11, TH).severity is Severity.WARNING
    assert rules.voltage_collapse("l", 1.1e-6, 11, TH) is None
    assert rules.voltage_collapse("l", 0.0, 10, TH) is None  # not more than 10 steps
    assert rules.voltage_collapse("l", float("nan"), 100, TH) is None  # no voltages recorded


def test_gradient_explosion_can_fire_with_few_records():
    assert rules.gradient_explosion([1.0, 1.0, 100.0], TH) is None  # exactly 100x
    p = rules.gradient_explosion([1.0, 1.0, 101.0], TH)
    assert p.severity is Severity.CRITICAL and "101x" in p.message
    assert rules.gradient_explosion([0.0, 0.0, 5.0], TH) is None  # median 0: nothing flows


def test_gradient_vanishing_edges():
    assert rules.gradient_vanishing("first", 0.01, "last", 1.0, TH) is None  # 100x
    assert rules.gradient_vanishing("first", 0.0099, "last", 1.0, TH).layer == "first"


def test_lyapunov_regimes_and_condition_and_trends():
    assert rules.lyapunov_regime(0.51, TH).category == "chaotic_dynamics"
    assert rules.lyapunov_regime(0.49, TH).category == "edge_of_chaos"
    assert rules.lyapunov_regime(-0.51, TH).category == "over_stable_dynamics"
    # edges at the thresholds' own fields (the statistic is the effective condition number)
    assert rules.condition_number(0.99 * TH.condition_warning, TH) is None
    assert rules.condition_number(1.1 * TH.condition_warning, TH).severity is Severity.WARNING
    assert rules.condition_number(1.1 * TH.condition_critical, TH).severity is Severity.CRITICAL
    assert rules.gradient_trend([1.0] * 10 + [10.5] * 10, TH).category == "exploding_gradient_trend"
    assert rules.gradient_trend([1.0] * 10 + [9.5] * 10, TH) is None
    assert rules.gradient_trend([1.0] * 10 + [0.09] * 10, TH).category == "vanishing_gradient_trend"


def test_thresholds_are_used():
    strict = Thresholds(dead_rate=0.5, dead_warning=0.0)
    assert rules.dead_neurons("l", np.full(10, 0.3), strict) is not None
    assert rules.dead_neurons("l", np.full(10, 0.3), TH) is None
    with pytest.raises(TypeError, match="dead_rat"):
        from stablespike import SpikeProfiler
        SpikeProfiler(dead_rat=0.1)
