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


def check_tensor(x, name: str, *, ndims: Sequence[int], layout: str,
                 floating: bool = False) -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite tensor with one of the allowed ranks (and a
    floating-point dtype when ``floating``).

    ``layout`` is the human-readable expected layout, e.g. ``"(T, B, N)"``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {describe(x)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {layout}, got {describe(x)}; "
                        f"convert it with {name}.float()")
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


def _number(value) -> float:
    """``value`` as a float; bools and non-numbers raise TypeError (``True`` is not an eps)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(value)
    return float(value)


def check_positive(value, name: str) -> float:
    """Check a strictly positive finite number (eps, slope, ...)."""
    try:
        ok = 0 < _number(value) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_fraction(value, name: str) -> float:
    """Check a number in (0, 1]."""
    try:
        ok = 0.0 < _number(value) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")
    return float(value)


def check_unit_interval(value, name: str) -> float:
    """Check a number in [0, 1] (a decay factor such as beta)."""
    try:
        ok = 0.0 <= _number(value) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def check_int(value, name: str, minimum: int = 1) -> int:
    """Check an integer (not a bool) of at least ``minimum``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok and isinstance(value, float) and value.is_integer() and value >= minimum:
        ok = True  # 2.0 is an integer a user may compute
    if not ok:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {describe(value)}")
    return value


def check_float_dtype(value, name: str):
    """Check ``None`` or a floating-point ``torch.dtype``."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name}: expected a floating-point torch.dtype such as torch.float64, "
                        f"got {describe(value)}")
    return value


def check_generator(value, name: str = "generator"):
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator or None, got {describe(value)}")
    return value


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
