"""Surrogate spike functions, injected into neurons as objects (``spike_grad=fast_sigmoid()``).

snnTorch's own surrogates cast the spike to float32 (``(x > 0).float()``), which breaks a float64
twin trajectory, and they define no forward-mode derivative. These keep the input's dtype, and
define ``backward`` and ``jvp`` with the same surrogate derivative, so that gradients (reverse
mode) and tangent dynamics (forward mode) see the same Jacobian.
"""
from __future__ import annotations

import torch


def _denominator(u: torch.Tensor, slope: float) -> torch.Tensor:
    """``(1 + slope |u|)^2``, built in place on one temporary (this runs per neuron per step),
    unless autograd records it (a tangent that is itself differentiated, or double backward)."""
    if torch.is_grad_enabled() and u.requires_grad:
        return (1.0 + slope * u.abs()) ** 2
    d = torch.abs(u).mul_(slope).add_(1.0)
    return d.mul_(d)


class _FastSigmoidSpike(torch.autograd.Function):
    """Heaviside forward, derivative ``1 / (1 + slope |u|)^2`` (SuperSpike) in both AD modes.

    Written in the ``forward(ctx, ...)`` style on purpose: with a separate ``setup_context``,
    ``Function.apply`` runs ``inspect.signature`` on every call, which costs more than the spike
    itself on the per-step hot path. Forward-mode AD goes through ``torch.autograd.forward_ad``.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.save_for_forward(u)
        ctx.slope = slope
        # gt into a tensor of u's dtype: 4-5x faster on CPU than (u > 0).to(dtype)
        return torch.gt(u, 0, out=torch.empty_like(u))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad_out / _denominator(u, ctx.slope), None

    @staticmethod
    def jvp(ctx, u_tangent: torch.Tensor, _slope_tangent):
        (u,) = ctx.saved_tensors
        return u_tangent / _denominator(u, ctx.slope)


class FastSigmoid:
    """Callable surrogate: ``spk = FastSigmoid(slope)(mem - threshold)``, shape and dtype preserved."""

    def __init__(self, slope: float = 25.0):
        if not slope > 0:
            raise ValueError(f"slope: expected a positive number, got {slope!r}")
        self.slope = float(slope)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return _FastSigmoidSpike.apply(u, self.slope)

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        """The surrogate derivative d spk / d u at ``u`` (same shape as ``u``)."""
        return 1.0 / _denominator(u, self.slope)

    def __repr__(self) -> str:
        return f"FastSigmoid(slope={self.slope:g})"


def fast_sigmoid(slope: float = 25.0) -> FastSigmoid:
    """The seeds' default surrogate (``snntorch.surrogate.fast_sigmoid(slope=25)``), dtype-preserving."""
    return FastSigmoid(slope)
