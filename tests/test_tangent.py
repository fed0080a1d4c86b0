"""The tangent-space spectrum against exponents known from mathematics (REFERENCES.md section 1)."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from stablespike import SpikingMLP, finite_difference_lyapunov
from stablespike.lyapunov.tangent import tangent_spectrum

from steppers import Henon, LinearMap, LogisticMap, TanhRNN, rotation


def zeros(T, B, D=1):
    return torch.zeros(T, B, D, dtype=torch.float64)


def test_logistic_map_ln2():
    r = tangent_spectrum(LogisticMap(), zeros(5000, 16))
    assert abs(float(r.exponents[0]) - math.log(2)) < 1e-3


def test_henon_spectrum_and_its_exact_sum():
    r = tangent_spectrum(Henon(), zeros(3000, 48), k=2, discard=100)
    assert 0.418 <= float(r.exponents[0]) <= 0.422
    assert abs(float(r.exponents.sum()) - math.log(0.3)) < 1e-6


@pytest.mark.parametrize("A, expected", [
    ([[1.1, 0.0], [0.0, 0.8]], [math.log(1.1), math.log(0.8)]),
    (rotation(0.7, 0.9), [math.log(0.9), math.log(0.9)]),
    ([[0.5, 4.0], [0.0, 0.3]], [math.log(0.5), math.log(0.3)]),
])
def test_linear_maps(A, expected):
    r = tangent_spectrum(LinearMap(A), zeros(300, 3), k=2, discard=50)
    assert torch.allclose(r.exponents, torch.tensor(expected, dtype=torch.float64), atol=1e-3)


def test_tanh_rnn_below_the_edge_gives_ln_g_rho():
    rnn = TanhRNN(40, g=0.6)
    rho = float(torch.linalg.eigvals(rnn.W).abs().max())
    r = tangent_spectrum(rnn, zeros(800, 2, 40), discard=400)
    assert abs(float(r.exponents[0]) - math.log(0.6 * rho)) < 0.01


def test_tanh_rnn_mean_field_at_g2():
    r = tangent_spectrum(TanhRNN(400, g=2.0), zeros(1500, 2, 400), discard=300)
    assert abs(float(r.exponents[0]) - 0.148) < 0.03


def test_tangent_and_finite_difference_agree_on_a_smooth_system():
    # same trajectories, same initial direction: the two estimators follow the same vector
    rnn, x = TanhRNN(60, g=2.0, seed=3), zeros(800, 4, 60)
    tangent = tangent_spectrum(rnn, x, discard=100, generator=torch.Generator().manual_seed(5))
    fd = finite_difference_lyapunov(rnn, x, eps=1e-7, discard=100, generator=torch.Generator().manual_seed(5))
    assert float(tangent.exponents[0]) > 0.05
    assert torch.allclose(tangent.per_sample[:, 0], fd.per_sample, rtol=0.02)


def test_lif_below_threshold_gives_ln_beta_for_every_exponent():
    torch.manual_seed(0)
    model = SpikingMLP(6, [10, 8], 2, beta=0.9, threshold=1e9).double()
    r = tangent_spectrum(model, torch.rand(3, 30, 6, dtype=torch.float64) * 3, k=6, batch_dim=0)
    assert torch.allclose(r.exponents, torch.full((6,), math.log(0.9), dtype=torch.float64), atol=1e-9)


def test_a_lif_stepper_below_threshold_gives_ln_beta_through_the_stepper_driver():
    from steppers import LIFStepper
    x = torch.rand(30, 3, 6, dtype=torch.float64) * 3
    r = tangent_spectrum(LIFStepper(0.8, threshold=1e9), x, k=5)
    assert torch.allclose(r.exponents, torch.full((5,), math.log(0.8), dtype=torch.float64), atol=1e-9)


def test_tangent_step_equals_autograd_jacobian_with_the_surrogate():
    torch.manual_seed(1)
    model = SpikingMLP(5, [7, 6], 2, threshold=0.3).double()
    x_t = torch.rand(1, 5, dtype=torch.float64) * 2
    mem0 = (torch.rand(1, 7, dtype=torch.float64) * 0.6, torch.rand(1, 6, dtype=torch.float64) * 0.6)
    spikes0 = tuple(torch.zeros_like(m) for m in mem0)

    def step(m_a, m_b):
        _, state = model.step(x_t, (m_a, m_b) + spikes0)
        return state[0], state[1]

    jac = torch.autograd.functional.jacobian(step, mem0)  # blocks d next_mem_i / d mem_j
    J = torch.cat([torch.cat([jac[i][j].reshape(mem0[i].numel(), mem0[j].numel()) for j in range(2)], 1)
                   for i in range(2)], 0)
    v = torch.randn(13, dtype=torch.float64)
    with fwAD.dual_level():
        duals = (fwAD.make_dual(mem0[0], v[:7].view(1, 7)), fwAD.make_dual(mem0[1], v[7:].view(1, 6)))
        out = step(*duals)
        jvp = torch.cat([fwAD.unpack_dual(o).tangent.reshape(-1) for o in out])
    assert torch.allclose(jvp, J @ v, atol=1e-12)
    assert not torch.allclose(J, torch.block_diag(0.9 * torch.eye(7), 0.9 * torch.eye(6)).double())


def test_result_is_differentiable_and_reports_convergence():
    torch.manual_seed(2)
    model = SpikingMLP(6, [16, 16], 2, threshold=0.4)
    r = tangent_spectrum(model, torch.rand(4, 20, 6) * 2, k=3, batch_dim=0)
    (r.exponents ** 2).sum().backward()  # flossing-style loss
    assert model.linears[1].weight.grad is not None and torch.isfinite(model.linears[1].weight.grad).all()
    assert model.linears[1].weight.grad.abs().sum() > 0
    assert r.history.shape == (19, 3) and math.isfinite(r.convergence)  # steps after the first
    assert "tangent Lyapunov spectrum" in str(r)


def test_bad_input():
    with pytest.raises(ValueError, match="k: expected at most the continuous state dimension 2"):
        tangent_spectrum(Henon(), zeros(5, 1), k=3)
    with pytest.raises(ValueError, match="t_ons"):
        tangent_spectrum(Henon(), zeros(5, 1), t_ons=0)

    class NotATuple:
        def init_state(self, b, device, dtype):
            return [torch.zeros(b, 2)]

        def step(self, x_t, state):
            return state[0], state

    with pytest.raises(TypeError, match="tuple of tensors"):
        tangent_spectrum(NotATuple(), zeros(5, 1))


class TwoLayerLinear:
    """h0 <- 0.5 h0 + x; h1 <- 0.9 h1 + W h0 with W = 3 x orthogonal: layer-to-layer gain ln 3."""

    def __init__(self):
        q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        self.W = 3.0 * q

    def init_state(self, batch_size, device, dtype):
        return (torch.zeros(batch_size, 5, dtype=dtype), torch.zeros(batch_size, 5, dtype=dtype))

    def step(self, x_t, state):
        h0 = 0.5 * state[0] + x_t
        h1 = 0.9 * state[1] + h0 @ self.W.T
        return h1, (h0, h1)


def test_depthwise_gain_of_a_known_two_layer_map():
    from stablespike import depthwise_gain
    r = depthwise_gain(TwoLayerLinear(), torch.rand(6, 3, 5, dtype=torch.float64))
    assert torch.allclose(r.per_sample, torch.full((3, 1), math.log(3.0), dtype=torch.float64))
    assert "nats/layer" in str(r)


def test_depthwise_gain_predicts_vanishing_in_a_deep_mlp_with_tiny_weights():
    from stablespike import depthwise_gain
    torch.manual_seed(0)
    healthy, tiny = (SpikingMLP(16, [64] * 6, 2, threshold=0.5) for _ in range(2))
    with torch.no_grad():
        for lin in tiny.linears[1:]:
            lin.weight.mul_(0.05)
    x = torch.rand(4, 10, 16) * 2  # (B, T, D), as the model takes it
    assert depthwise_gain(tiny, x, batch_dim=0).mean < depthwise_gain(healthy, x, batch_dim=0).mean - 1.0


def test_analyze_dynamics_on_the_three_seed_models():
    from stablespike import RecurrentSpikingMLP, SpikingVGG, analyze_dynamics
    torch.manual_seed(3)
    seq = torch.rand(3, 12, 8) * 2  # the sequence models take (B, T, D), as seed 001
    for model, x, batch_dim in ((SpikingMLP(8, [16, 16], 2, threshold=0.5), seq, 0),
                                (RecurrentSpikingMLP(8, [12, 12], 2), seq, 0),
                                (SpikingVGG(1, 2, base_channels=4, num_stages=2, blocks_per_stage=1,
                                            input_size=8).eval(), torch.rand(4, 2, 1, 8, 8) * 3, 1)):
        report = analyze_dynamics(model, x, batch_dim=batch_dim, eps=1e-3, k=2, depth=True)
        assert report.tangent.exponents.shape == (2,) and torch.isfinite(report.tangent.exponents).all()
        assert math.isfinite(report.depth.mean) and math.isfinite(float(report.finite_difference))
        text = str(report)
        assert "finite-size" in text and "tangent" in text and "depth-wise" in text
