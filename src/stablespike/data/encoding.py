"""Encoders: static inputs and sequences to time-first spike or current trains ``(T, B, ...)``.

Inputs are floating-point tensors (images scaled to [0, 1]); ``T`` is a positive integer number of
time steps. Anything else raises an error naming the argument: a uint8 image would otherwise read
as "always 1" in ``rate`` and ``latency``, and ``T=2.5`` would silently run 2 steps.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from .._checks import check_tensor, describe

ENCODERS = ("direct", "rate", "latency", "sequence")


def _check_input(x, layout: str, ndims=range(1, 6)) -> torch.Tensor:
    """A finite, non-empty floating-point tensor with one of the allowed ranks."""
    check_tensor(x, "x", ndims=ndims, layout=layout)
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor {layout} (images scaled to [0, 1], e.g. "
                        f"x.float() / 255), got {describe(x)}")
    return x


def _check_steps(T) -> int:
    """``T`` as an int >= 1: Python or numpy integers and 0-d integer tensors; bools, floats and
    strings are refused rather than truncated."""
    try:
        steps = None if isinstance(T, bool) else operator.index(T)
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise ValueError(f"T: expected a positive integer number of time steps, got "
                         f"{type(T).__name__} {T!r}")
    return steps


def _check_generator(generator) -> None:
    """``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")


def direct(x: torch.Tensor, T: int) -> torch.Tensor:
    """The static input repeated as a current at every step (seed 002): ``(B, ...) -> (T, B, ...)``
    (a view; no copy)."""
    _check_input(x, "(B, ...)")
    return x.unsqueeze(0).expand(_check_steps(T), *x.shape)


def rate(x: torch.Tensor, T: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bernoulli spikes with probability ``x`` (clipped to [0, 1]) at each step: ``(T, B, ...)``.

    With a ``generator``, the spikes are drawn on the generator's device and moved to ``x``'s, so a
    CPU generator (as training seeds per epoch) works for CUDA inputs and gives the same spikes."""
    _check_input(x, "(B, ...)")
    T = _check_steps(T)
    _check_generator(generator)
    p = x.clamp(0, 1).unsqueeze(0).expand(T, *x.shape)
    if generator is None or generator.device == x.device:
        return torch.bernoulli(p, generator=generator)
    return torch.bernoulli(p.to(generator.device), generator=generator).to(x.device)


def latency(x: torch.Tensor, T: int) -> torch.Tensor:
    """One spike per input, earlier for larger values: at step ``round((1 - x) * (T - 1))``;
    inputs <= 0 never spike. ``(B, ...) -> (T, B, ...)``."""
    _check_input(x, "(B, ...)")
    T = _check_steps(T)
    v = x.clamp(0, 1)
    step = torch.round((1 - v) * (T - 1)).long()
    t = torch.arange(T, device=x.device).view(T, *([1] * x.dim()))
    return ((t == step.unsqueeze(0)) & (v > 0).unsqueeze(0)).to(x.dtype)


def sequence(x: torch.Tensor) -> torch.Tensor:
    """A sequence presented one element per step: ``(B, L) -> (L, B, 1)`` (MNIST-1D), and an
    image row by row: ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(H, B, W)``."""
    layout = "(B, L), (B, H, W) or (B, 1, H, W)"
    _check_input(x, layout, ndims=(2, 3, 4))
    if x.dim() == 2:
        return x.t().unsqueeze(-1)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x: row-by-row input needs one channel {layout}, got {describe(x)}")
        x = x[:, 0]
    return x.permute(1, 0, 2)


def encode(x: torch.Tensor, encoder: str, T: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatch by name (one of :data:`ENCODERS`). ``sequence`` sets its own number of steps (the
    sequence length) and ignores ``T`` and ``generator``."""
    if encoder == "direct":
        return direct(x, T)
    if encoder == "rate":
        return rate(x, T, generator)
    if encoder == "latency":
        return latency(x, T)
    if encoder == "sequence":
        return sequence(x)
    raise ValueError(f"encoder: expected one of {', '.join(ENCODERS)}, got {encoder!r}")
