"""The fast-sigmoid surrogate: Heaviside forward in the input's dtype, SuperSpike derivative in
both reverse and forward mode, equal to snnTorch's own fast_sigmoid on the same input."""
import torch
import torch.autograd.forward_ad as fwAD
from snntorch import surrogate as snn_surrogate

from stablespike import fast_sigmoid


def test_forward_is_heaviside_in_the_input_dtype():
    u = torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 2.0], dtype=torch.float64)
    out = fast_sigmoid(25)(u)
    assert out.dtype == torch.float64 and out.tolist() == [0, 0, 0, 1, 1]


def test_gradient_matches_formula_and_snntorch():
    u = torch.linspace(-1, 1, 41, requires_grad=True)
    fast_sigmoid(25)(u).sum().backward()
    expected = 1.0 / (1.0 + 25 * u.detach().abs()) ** 2
    assert torch.allclose(u.grad, expected)
    v = u.detach().clone().requires_grad_(True)
    snn_surrogate.fast_sigmoid(slope=25)(v).sum().backward()
    assert torch.allclose(u.grad, v.grad)


def test_forward_mode_derivative_equals_reverse_mode():
    u = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    tangent = torch.randn(11, dtype=torch.float64)
    with fwAD.dual_level():
        out = fast_sigmoid(10)(fwAD.make_dual(u, tangent))
        jvp = fwAD.unpack_dual(out).tangent
    assert torch.allclose(jvp, tangent / (1 + 10 * u.abs()) ** 2)
    assert torch.allclose(fast_sigmoid(10).derivative(u), 1 / (1 + 10 * u.abs()) ** 2)
