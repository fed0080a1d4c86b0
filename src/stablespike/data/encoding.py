"""Encoders: static inputs and sequences to time-first spike or current trains ``(T, B, ...)``."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_positive, check_tensor

ENCODERS = ("direct", "rate", "latency", "sequence")


def direct(x: torch.Tensor, T: int) -> torch.Tensor:
    """The static input repeated as a current at every step (seed 002): ``(B, ...) -> (T, B, ...)``."""
    check_tensor(x, "x", ndims=range(1, 6), layout="(B, ...)")
    return x.unsqueeze(0).expand(int(check_positive(T, "T")), *x.shape)


def rate(x: torch.Tensor, T: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bernoulli spikes with probability ``x`` (clipped to [0, 1]) at each step: ``(T, B, ...)``."""
    check_tensor(x, "x", ndims=range(1, 6), layout="(B, ...)")
    p = x.clamp(0, 1).unsqueeze(0).expand(int(check_positive(T, "T")), *x.shape)
    return torch.bernoulli(p, generator=generator)


def latency(x: torch.Tensor, T: int) -> torch.Tensor:
    """One spike per input, earlier for larger values: at step ``round((1 - x) * (T - 1))``;
    inputs <= 0 never spike. ``(B, ...) -> (T, B, ...)``."""
    check_tensor(x, "x", ndims=range(1, 6), layout="(B, ...)")
    T = int(check_positive(T, "T"))
    v = x.clamp(0, 1)
    step = torch.round((1 - v) * (T - 1)).long()
    t = torch.arange(T, device=x.device).view(T, *([1] * x.dim()))
    return ((t == step.unsqueeze(0)) & (v > 0).unsqueeze(0)).to(x.dtype)


def sequence(x: torch.Tensor) -> torch.Tensor:
    """A sequence presented one element per step: ``(B, L) -> (L, B, 1)`` (MNIST-1D), and an
    image row by row: ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(H, B, W)``."""
    check_tensor(x, "x", ndims=(2, 3, 4), layout="(B, L), (B, H, W) or (B, 1, H, W)")
    if x.dim() == 2:
        return x.t().unsqueeze(-1)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x: row-by-row input needs one channel, got {x.shape[1]} channels")
        x = x[:, 0]
    return x.permute(1, 0, 2)


def encode(x: torch.Tensor, encoder: str, T: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatch by name (one of :data:`ENCODERS`)."""
    if encoder == "direct":
        return direct(x, T)
    if encoder == "rate":
        return rate(x, T, generator)
    if encoder == "latency":
        return latency(x, T)
    if encoder == "sequence":
        return sequence(x)
    raise ValueError(f"encoder: expected one of {', '.join(ENCODERS)}, got {encoder!r}")
