"""Small steppers with known exponents, used by the tests (plain classes, as a user would write)."""
from __future__ import annotations

import math

import torch


class LinearMap:
    """x -> A x on state ``(B, n)``; exponents are ln |eigenvalues of A|."""

    def __init__(self, A):
        self.A = torch.as_tensor(A, dtype=torch.float64)

    def init_state(self, batch_size, device, dtype):
        return (torch.ones(batch_size, self.A.shape[0], device=device, dtype=dtype),)

    def step(self, x_t, state):
        (x,) = state
        y = x @ self.A.to(x.dtype).T
        return y, (y,)


class PerSampleScale:
    """x -> s_b x with one scale per sample ``b``: exponent of sample b is ln |s_b|."""

    def __init__(self, scales):
        self.scales = torch.as_tensor(scales, dtype=torch.float64)

    def init_state(self, batch_size, device, dtype):
        return (torch.ones(batch_size, 3, device=device, dtype=dtype),)

    def step(self, x_t, state):
        (x,) = state
        idx = x_t[:, 0].long()  # the input carries each row's sample id, so twins use their own scale
        y = x * self.scales.to(x.dtype)[idx].unsqueeze(1)
        return y, (y,)


class LogisticMap:
    """x -> 4 x (1 - x) per sample, state ``(B, 1)``; exponent ln 2."""

    def init_state(self, batch_size, device, dtype):
        g = torch.Generator().manual_seed(0)
        x0 = 0.05 + 0.9 * torch.rand(batch_size, 1, generator=g, dtype=torch.float64)
        return (x0.to(device=device, dtype=dtype),)

    def step(self, x_t, state):
        (x,) = state
        y = 4.0 * x * (1.0 - x)
        return y, (y,)


def rotation(theta: float, radius: float):
    c, s = math.cos(theta), math.sin(theta)
    return [[radius * c, -radius * s], [radius * s, radius * c]]
