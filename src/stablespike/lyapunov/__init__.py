"""Lyapunov exponents of spiking networks, and penalties that use them as a loss term.

* :func:`finite_difference_lyapunov` — Benettin two-trajectory, finite-size exponent (seeds 001/002).
* :func:`compute_lyap_reg_loss`, :class:`LyapunovRegularizer` — the ten penalty kinds of seed 002.
"""
from .finite_difference import FiniteDifferenceResult, finite_difference_lyapunov
from .regularizers import PENALTY_KINDS, LyapunovRegularizer, compute_lyap_reg_loss

__all__ = [
    "FiniteDifferenceResult",
    "finite_difference_lyapunov",
    "PENALTY_KINDS",
    "LyapunovRegularizer",
    "compute_lyap_reg_loss",
]
