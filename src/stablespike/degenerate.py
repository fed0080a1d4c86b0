"""Warnings for estimates that are not measurements: NaN/inf results and logs stuck at the floor.

An estimator accumulates logs of growth factors. Two things make such a number meaningless without
raising: a growth factor that overflows (inf, then NaN after a renormalization), and one that
underflows to zero, whose log is floored at ``ln(tiny)`` of the dtype (-87.3 in float32, -708 in
float64) instead of -inf. Both are reported as a ``RuntimeWarning`` that names the argument to change.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ._checks import user_stacklevel


class FlooredLog:
    """``log(x)`` for magnitudes ``x >= 0``, floored at the dtype's smallest normal number, that
    remembers (as a tensor, without synchronizing) whether the floor was hit."""

    def __init__(self):
        self._hit: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tiny = torch.finfo(x.dtype).tiny
        hit = (x.detach() < tiny).any()
        self._hit = hit if self._hit is None else self._hit | hit
        return torch.log(x.clamp_min(tiny))

    @property
    def hit(self) -> bool:
        return self._hit is not None and bool(self._hit)


def warn_degenerate(estimator: str, values: torch.Tensor, floor: Optional[FlooredLog],
                    overflow_hint: str, floor_hint: str) -> None:
    """Warn when ``values`` (the estimate) hold NaN/inf, or when ``floor`` was hit on the way.

    ``overflow_hint`` and ``floor_hint`` say what to change, naming the argument
    (e.g. "lower t_ons (got 200)").
    """
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        warnings.warn(
            f"{estimator}: {int(bad.sum())} of {values.numel()} values are NaN or inf: the "
            f"perturbation overflowed {values.dtype} between renormalizations. {overflow_hint}",
            RuntimeWarning, stacklevel=user_stacklevel())
    if floor is not None and floor.hit:
        tiny = torch.finfo(values.dtype).tiny
        warnings.warn(
            f"{estimator}: a growth factor underflowed to zero and its log was floored at "
            f"ln({tiny:.3g}) = {math.log(tiny):.1f}: the dynamics collapse the perturbation "
            f"completely there, and the true value is lower than reported. {floor_hint}",
            RuntimeWarning, stacklevel=user_stacklevel())
