"""Penalties on a Lyapunov exponent estimate: the ten kinds of seed 002, and a warmup schedule.

Measuring is pure (the estimators); acting is here (a loss term), as ``clip_grad_norm_`` keeps
measuring apart from changing. ``lam`` below is the exponent estimate (a tensor).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch.nn.functional import relu

_SIGMOID_TEMPERATURE = 0.5  # seed 002: moderately sharp transition around the threshold


def _squared(lam, target, threshold):  # (lam - target)^2: pull toward the target
    return (lam - target) ** 2


def _hinge(lam, target, threshold):  # relu(lam)^2: only chaos (lam > 0) is penalized
    return relu(lam) ** 2


def _asymmetric(lam, target, threshold):  # strong on chaos, weak on collapse below -1
    return relu(lam) ** 2 + 0.1 * relu(-lam - 1.0) ** 2


def _extreme(lam, target, threshold):  # only severe chaos, above the threshold
    return relu(lam - threshold) ** 2


def _adaptive_linear(lam, target, threshold):  # excess^3: gentle near threshold, strong far
    return relu(lam - threshold) ** 3


def _adaptive_exp(lam, target, threshold):  # (exp(excess) - 1) * excess
    excess = relu(lam - threshold)
    return torch.expm1(excess) * excess


def _adaptive_sigmoid(lam, target, threshold):  # sigmoid gate around threshold x (lam - target)^2
    gate = torch.sigmoid((lam - threshold) / _SIGMOID_TEMPERATURE)
    return gate * (lam - target) ** 2


def _mult_linear(lam, target, threshold):  # relu(lam) * relu(lam)
    return relu(lam) ** 2


def _mult_squared(lam, target, threshold):  # relu(lam)^2 * relu(lam)
    return relu(lam) ** 3


def _mult_log(lam, target, threshold):  # log(1 + relu(lam)) * relu(lam)
    pos = relu(lam)
    return torch.log1p(pos) * pos


def _flossing(lam, target, threshold):  # sum of squared exponents (gradient flossing, Engelken 2023)
    return (lam ** 2).sum()


PENALTIES: Dict[str, Callable] = {
    "squared": _squared,
    "hinge": _hinge,
    "asymmetric": _asymmetric,
    "extreme": _extreme,
    "adaptive_linear": _adaptive_linear,
    "adaptive_exp": _adaptive_exp,
    "adaptive_sigmoid": _adaptive_sigmoid,
    "mult_linear": _mult_linear,
    "mult_squared": _mult_squared,
    "mult_log": _mult_log,
    "flossing": _flossing,  # for a tangent spectrum (k,); on a scalar it is lambda^2
}
PENALTY_KINDS = tuple(PENALTIES)


def _check_kind(kind: str, name: str = "reg_type") -> Callable:
    try:
        return PENALTIES[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"{name}: expected one of {', '.join(PENALTY_KINDS)}, got {kind!r}"
        ) from None


def _is_finite(value) -> bool:
    """A real number (not a bool or a string) that is neither NaN nor infinite."""
    try:
        return not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def compute_lyap_reg_loss(lyap_est: torch.Tensor, reg_type: str, lambda_target: float,
                          lyap_threshold: float = 2.0) -> torch.Tensor:
    """Seed 002's penalty on an exponent estimate (scalar or any shape; elementwise), plus
    ``flossing``, the sum of squares of a spectrum ``(k,)`` from :func:`tangent_spectrum`.

    ``lyap_est``: a tensor (the gradient flows through it), a number, or the result of
    :func:`finite_difference_lyapunov` (its ``.exponent``). ``lambda_target`` is used by
    ``squared`` and ``adaptive_sigmoid``; ``lyap_threshold`` by ``extreme``, ``adaptive_*``. An
    unknown ``reg_type`` raises ValueError listing the valid ones.
    """
    penalty = _check_kind(reg_type)
    for name, value in (("lambda_target", lambda_target), ("lyap_threshold", lyap_threshold)):
        if not _is_finite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    exponent = getattr(lyap_est, "exponent", None)
    if isinstance(exponent, torch.Tensor):  # a result of finite_difference_lyapunov: its exponent
        lyap_est = exponent  # (float() of the result would cut the penalty off from the graph)
    if not isinstance(lyap_est, torch.Tensor):
        if isinstance(lyap_est, bool) or not isinstance(lyap_est, numbers.Real):
            raise TypeError(f"lyap_est: expected a tensor, a number or a result of "
                            f"finite_difference_lyapunov, got {type(lyap_est).__name__}")
        lyap_est = torch.as_tensor(float(lyap_est))
    return penalty(lyap_est, float(lambda_target), float(lyap_threshold))


@dataclass
class LyapunovRegularizer:
    """``weight * penalty(lambda)`` with a linear warmup of the weight over the first epochs.

    Epochs count from 1, as in seed 002: with ``warmup_epochs=W`` the weight is
    ``weight * epoch / W`` for ``epoch <= W`` and ``weight`` afterwards.
    """

    weight: float = 0.3
    kind: str = "squared"
    target: float = -0.1
    threshold: float = 2.0
    warmup_epochs: int = 0

    def __post_init__(self):
        _check_kind(self.kind, "kind")
        if not _is_finite(self.weight) or self.weight < 0:
            raise ValueError(f"weight: expected a finite number >= 0, got {self.weight!r}")
        for name in ("target", "threshold"):  # a NaN target makes every penalty NaN: a "diverged" run
            if not _is_finite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
        warmup = self.warmup_epochs
        if isinstance(warmup, bool) or not _is_finite(warmup) or int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup_epochs: expected an integer >= 0, got {warmup!r}")

    def weight_at(self, epoch: Optional[int] = None) -> float:
        """The effective weight at 1-based ``epoch`` (the full weight when ``epoch`` is None)."""
        if epoch is None or self.warmup_epochs == 0 or epoch > self.warmup_epochs:
            return self.weight
        if epoch < 1:
            raise ValueError(f"epoch: expected an epoch number >= 1, got {epoch!r}")
        return self.weight * epoch / self.warmup_epochs

    def __call__(self, lyap_est: torch.Tensor, epoch: Optional[int] = None) -> torch.Tensor:
        """The loss term ``weight_at(epoch) * penalty(lyap_est)``."""
        return self.weight_at(epoch) * compute_lyap_reg_loss(
            lyap_est, self.kind, self.target, self.threshold
        )
