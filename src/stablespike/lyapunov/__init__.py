"""Lyapunov exponents of spiking networks, and penalties that use them as a loss term.

* :func:`finite_difference_lyapunov` — Benettin two-trajectory, finite-size exponent (seeds 001/002).
* :func:`tangent_spectrum` — top-k exponents of the linearized dynamics (forward-mode AD + QR),
  with the surrogate derivative in the Jacobian.
* :func:`compute_lyap_reg_loss`, :class:`LyapunovRegularizer` — the ten penalty kinds of seed 002.
"""
from .finite_difference import FiniteDifferenceResult, finite_difference_lyapunov
from .regularizers import PENALTY_KINDS, LyapunovRegularizer, compute_lyap_reg_loss
from .tangent import TangentResult, tangent_spectrum

__all__ = [
    "FiniteDifferenceResult",
    "finite_difference_lyapunov",
    "PENALTY_KINDS",
    "LyapunovRegularizer",
    "compute_lyap_reg_loss",
    "TangentResult",
    "tangent_spectrum",
]
