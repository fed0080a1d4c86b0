"""Estimates that are not measurements say so: NaN/inf results, logs floored at the dtype's
smallest normal, and finite-difference twins that saturate between renormalizations."""
import math
import warnings

import pytest
import torch

from stablespike.lyapunov import depthwise_gain, finite_difference_lyapunov, tangent_spectrum
from steppers import LinearMap, LogisticMap
from user_models import snntorch_tutorial5


def _runtime_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_overflow_between_renormalizations_warns_naming_renorm_every():
    # |3^100| overflows float32: the interval's growth is inf, the result NaN
    result, messages = _runtime_warnings(lambda: finite_difference_lyapunov(
        LinearMap([[3.0, 0.0], [0.0, 2.0]]), torch.zeros(200, 4, 1), eps=1e-3, renorm_every=100))
    assert not torch.isfinite(result.per_sample).any()
    assert any("NaN or inf" in m and "renorm_every (got 100)" in m for m in messages)


def test_tangent_overflow_warns_naming_t_ons():
    # the logistic map's tangent grows like 2^t: 200 steps between orthonormalizations overflow
    result, messages = _runtime_warnings(lambda: tangent_spectrum(
        LogisticMap(), torch.zeros(600, 4, 1), t_ons=200))
    assert not torch.isfinite(result.exponents).all()
    assert any("t_ons (got 200)" in m for m in messages)


def test_tangent_floor_warns_instead_of_reporting_minus_87():
    # the zero map kills every tangent: ln 0 = -inf, floored at ln(tiny) = -87.3 in float32
    result, messages = _runtime_warnings(lambda: tangent_spectrum(
        LinearMap([[0.0, 0.0], [0.0, 0.0]]), torch.zeros(20, 3, 1), k=2))
    assert torch.allclose(result.exponents, torch.full((2,), math.log(torch.finfo(torch.float32).tiny)))
    assert any("floored" in m for m in messages)


def test_depthwise_gain_floor_warns_when_a_layer_passes_nothing_on():
    net = snntorch_tutorial5(weight_gain=4.0)
    with torch.no_grad():
        net.fc2.weight.zero_()  # the second layer never sees the first layer's perturbation
    result, messages = _runtime_warnings(lambda: depthwise_gain(net, torch.rand(4, 20), batch_dim=0))
    assert float(result.per_layer[0].detach()) < -20
    assert any("depthwise_gain" in m and "floored" in m for m in messages)


def test_saturated_twins_warn_and_a_resolved_run_does_not():
    x = torch.zeros(600, 8, 1, dtype=torch.float64)
    # 150 steps of doubling carry a 1e-6 perturbation to the size of the attractor: saturated
    saturated, messages = _runtime_warnings(lambda: finite_difference_lyapunov(
        LogisticMap(), x, eps=1e-6, renorm_every=150))
    assert float(saturated) < 0.5 * math.log(2)
    assert any("saturated" in m and "renorm_every (got 150)" in m for m in messages)
    # 10 steps grow 1e-9 by 2^10 only: still linear, ln 2 recovered, nothing to say
    resolved, messages = _runtime_warnings(lambda: finite_difference_lyapunov(
        LogisticMap(), x, eps=1e-9, renorm_every=10))
    assert float(resolved) == pytest.approx(math.log(2), abs=0.01)
    assert messages == []


def test_an_explicit_eps_float32_cannot_resolve_warns_and_is_really_quantized():
    # snnTorch tutorial 5, 1000 + 5 membranes per sample, a threshold nothing reaches: no spike, so a
    # perturbation decays by beta each step and the exponent is ln(0.9) exactly. 1e-4 spread over
    # 1005 membranes is 3.2e-6 per value, a few float32 ulps of a membrane of order 1 (its error here:
    # 1e-3; at 1e-2, 7e-6; float64 twins, 3e-8).
    net = snntorch_tutorial5(num_hidden=1000, threshold=1e9)
    x = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))

    def estimate(eps, twin_dtype=None):
        return _runtime_warnings(lambda: finite_difference_lyapunov(
            net, x, batch_dim=0, eps=eps, twin_dtype=twin_dtype, generator=torch.Generator().manual_seed(0)))

    quantized, messages = estimate(1e-4)
    assert any("eps=0.0001" in m and "below what torch.float32 resolves" in m and "float64" in m
               for m in messages)
    assert float((quantized.per_sample.detach() - math.log(0.9)).abs().max()) > 1e-5
    for eps, twin_dtype, tolerance in ((1e-2, None, 5e-5), (1e-4, torch.float64, 1e-6)):
        resolved, messages = estimate(eps, twin_dtype)
        assert not [m for m in messages if "resolves" in m], (eps, twin_dtype, messages)
        assert float((resolved.per_sample.detach() - math.log(0.9)).abs().max()) < tolerance, (eps, twin_dtype)
