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
        x0 = 0.05 + 0.9 * per_row(batch_size, (1,), 0, "rand")
        return (x0.to(device=device, dtype=dtype),)

    def step(self, x_t, state):
        (x,) = state
        y = 4.0 * x * (1.0 - x)
        return y, (y,)


def per_row(batch_size: int, shape, seed: int, kind: str = "randn") -> torch.Tensor:
    """Row b of the initial state does not depend on the batch size (torch's CPU samplers fill
    tensors in blocks, so randn(4, n)[:2] need not equal randn(2, n))."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.randn if kind == "randn" else torch.rand
    block = draw(256, *shape, generator=g, dtype=torch.float64)
    return block[torch.arange(batch_size) % 256]


def rotation(theta: float, radius: float):
    c, s = math.cos(theta), math.sin(theta)
    return [[radius * c, -radius * s], [radius * s, radius * c]]


class Henon:
    """(x, y) -> (1 - a x^2 + y, b x); exponents ~0.419 and ln(b) - 0.419."""

    def __init__(self, a: float = 1.4, b: float = 0.3):
        self.a, self.b = a, b

    def init_state(self, batch_size, device, dtype):
        x0 = 0.1 * per_row(batch_size, (1,), 1, "rand")
        return (x0.to(device=device, dtype=dtype), x0.clone().to(device=device, dtype=dtype))

    def step(self, x_t, state):
        x, y = state
        return x, (1 - self.a * x * x + y, self.b * x)


class TanhRNN:
    """h -> g W tanh(h), W with N(0, 1/N) entries; state ``(B, N)``."""

    def __init__(self, n: int, g: float, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        self.g, self.n = g, n

    def init_state(self, batch_size, device, dtype):
        return (per_row(batch_size, (self.n,), 2).to(device=device, dtype=dtype),)

    def step(self, x_t, state):
        (h,) = state
        h = self.g * torch.tanh(h) @ self.W.T
        return h, (h,)


class LIFStepper:
    """Two LIF layers written in plain torch (no neuron modules: the stepper driver runs it):
    ``mem <- beta mem + W in - threshold spk_prev``, ``spk = mem > threshold``. State
    ``(mem1 (B, H1), mem2 (B, H2), spk1, spk2)``. Below threshold the Jacobian of the membranes
    is ``beta I`` whatever the weights: every exponent is ln(beta)."""

    def __init__(self, beta: float, sizes=(6, 10, 8), threshold: float = 1.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.W1 = torch.randn(sizes[1], sizes[0], generator=gen, dtype=torch.float64)
        self.W2 = torch.randn(sizes[2], sizes[1], generator=gen, dtype=torch.float64)
        self.beta, self.threshold, self.sizes = beta, threshold, sizes

    def init_state(self, batch_size, device, dtype):
        zeros = [torch.zeros(batch_size, h, device=device, dtype=dtype) for h in self.sizes[1:]]
        return tuple(zeros) + tuple(torch.zeros_like(z) for z in zeros)

    def state_spec(self):
        from stablespike.dynamics import StateSpec
        return (StateSpec(0, "membrane"), StateSpec(1, "membrane"), StateSpec(0, "spike"), StateSpec(1, "spike"))

    def step(self, x_t, state):
        mem1, mem2, spk1, spk2 = state
        mem1 = self.beta * mem1 + x_t @ self.W1.to(x_t.dtype).T - self.threshold * spk1
        spk1 = (mem1 > self.threshold).to(mem1.dtype)
        mem2 = self.beta * mem2 + spk1 @ self.W2.to(x_t.dtype).T - self.threshold * spk2
        spk2 = (mem2 > self.threshold).to(mem2.dtype)
        return spk2, (mem1, mem2, spk1, spk2)
