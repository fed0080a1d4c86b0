"""StabilityMonitor (seed 000): diagnosis of known histories, spectra against numpy, firing stats."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from stablespike import (SpikingMLP, StabilityMetrics, StabilityMonitor, analyze_weight_spectrum,
                         compute_spectral_radius)


def monitor_with(lyap_values, grads=None):
    mon = StabilityMonitor()
    model = nn.Linear(3, 3)
    for i, lam in enumerate(lyap_values):
        model.weight.grad = torch.full((3, 3), (grads[i] if grads else 1.0) / 3.0)
        model.bias.grad = None
        mon.compute(model, lyapunov=torch.tensor(lam))
    return mon


def test_diagnose_chaotic_edge_and_over_stable_histories():
    chaotic = monitor_with([0.2] * 10 + [0.9] * 20).diagnose()
    assert "CHAOTIC" in chaotic and "Lyapunov exponent: 0.9000" in chaotic
    assert "increase lambda_reg" in chaotic and "INCREASING" in chaotic
    edge = monitor_with([-0.05] * 30).diagnose()
    assert "EDGE OF CHAOS" in edge and "Suggestion" not in edge
    stable = monitor_with([-0.8] * 30).diagnose()
    assert "OVER-STABLE" in stable and "reducing the regularization" in stable


def test_gradient_trends_and_bounded_history():
    exploding = monitor_with([0.0] * 30, grads=[1.0] * 10 + [50.0] * 20)
    assert exploding.get_trends()["gradients"] == "EXPLODING"
    assert "EXPLODING" in exploding.diagnose()
    vanishing = monitor_with([0.0] * 30, grads=[1.0] * 10 + [0.01] * 20)
    assert vanishing.get_trends()["gradients"] == "VANISHING"
    long = monitor_with([0.0] * 250)
    assert len(long.lyap_history) == 100 and len(long.grad_history) == 100


def test_gradient_norm_and_singular_values_match_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    model(torch.randn(5, 6)).sum().backward()
    mon = StabilityMonitor()
    m = mon.compute(model, compute_sv=True)
    grads = [p.grad.numpy() for p in model.parameters()]
    assert m.grad_norm == pytest.approx(math.sqrt(sum((g ** 2).sum() for g in grads)), rel=1e-5)
    svs = [np.linalg.svd(p.grad.double().numpy(), compute_uv=False) for p in model.parameters()
           if p.dim() == 2]
    assert m.grad_max_sv == pytest.approx(max(s[0] for s in svs), rel=1e-6)
    assert m.grad_min_sv == pytest.approx(min(s[-1] for s in svs), rel=1e-6, abs=1e-12)
    per_layer = mon.compute_gradient_singular_values(model, top_k=2)
    assert set(per_layer) == {"0.weight", "1.weight"} and len(per_layer["0.weight"][0]) == 2


def test_spectral_radius_of_known_matrices():
    c, s = math.cos(0.3), math.sin(0.3)
    rot = 0.7 * torch.tensor([[c, -s], [s, c]])
    assert compute_spectral_radius(rot) == pytest.approx(0.7)
    assert compute_spectral_radius(torch.tensor([[0.5, 4.0], [0.0, 0.3]])) == pytest.approx(0.5)
    model = SpikingMLP(4, [5], 2)
    radii = analyze_weight_spectrum(nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 2)))
    assert list(radii) == ["0.weight"]
    assert analyze_weight_spectrum(model) == {}  # no square weights
    with pytest.raises(ValueError, match="square"):
        compute_spectral_radius(torch.zeros(2, 3))


def test_firing_stats_from_seed_recordings():
    spikes = torch.zeros(4, 10, 5)  # (B, T, H) as the seed models record
    spikes[:, :, 0] = 1
    spikes[:2, :5, 1] = 1  # neuron 1 fires in a quarter of (sample, step) pairs
    mon = StabilityMonitor()
    m = mon.compute(nn.Linear(1, 1), spikes=spikes, membrane=torch.ones(4, 10, 5))
    rates = np.array([1.0, 0.25, 0, 0, 0])
    assert m.firing_rate_mean == pytest.approx(rates.mean())
    assert m.firing_rate_std == pytest.approx(rates.std(ddof=1))
    assert m.dead_neuron_frac == pytest.approx(0.6) and m.saturated_neuron_frac == pytest.approx(0.2)
    assert m.membrane_mean == 1.0 and m.membrane_std == 0.0
    assert "dead=60.0%" in str(m) and isinstance(m.to_dict(), dict)
    assert StabilityMetrics().to_dict() == {}
