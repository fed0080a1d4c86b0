"""Input checks shared by every entry point: one wording for every bad-input error.

Each error names the argument, what was expected and what was given (DESIGN.md rule 8).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH_NN = os.path.dirname(os.path.abspath(torch.nn.__file__))


def describe(x) -> str:
    """Short description of a value for error messages: shape and dtype for tensors."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(x, name: str, *, ndims: Sequence[int], layout: str) -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite tensor with one of the allowed ranks.

    ``layout`` is the human-readable expected layout, e.g. ``"(T, B, N)"``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {describe(x)}")
    if not any(x.dim() == n for n in ndims):
        raise ValueError(
            f"{name}: expected a {' or '.join(f'{n}-D' for n in ndims)} tensor {layout}, "
            f"got {describe(x)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor {layout}, got {describe(x)} (empty)")
    # One reduction on the hot path: NaN and inf propagate into the sum. Only when the sum is not
    # finite are the entries counted (a huge but finite input may overflow the sum: then it passes).
    if x.is_floating_point() and not torch.isfinite(x.detach().sum()):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{name}: expected finite values, got {bad} NaN/inf entries in {describe(x)}")
    return x


def check_size(x: torch.Tensor, name: str, dim: int, expected: int, what: str, layout: str) -> None:
    """Check ``x.shape[dim] == expected``; ``what`` names the size (e.g. "input_dim")."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected layout {layout} with {what}={expected} in dimension {dim}, "
            f"got {describe(x)}"
        )


def check_positive(value, name: str) -> float:
    """Check a strictly positive finite number (eps, slope, ...)."""
    try:
        ok = float(value) > 0 and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_fraction(value, name: str) -> float:
    """Check a number in (0, 1]."""
    try:
        ok = 0.0 < float(value) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")
    return float(value)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called from stablespike that points at the first
    frame outside stablespike and torch.nn (the user's ``model(x)`` call, not our internals)."""
    frame, level = sys._getframe(1), 1  # the function that will call warnings.warn
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE) or path.startswith(_TORCH_NN)):
            return level
        frame, level = frame.f_back, level + 1
    return level
