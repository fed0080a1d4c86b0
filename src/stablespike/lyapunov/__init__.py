"""Lyapunov exponents of spiking networks, and penalties that use them as a loss term.

* :func:`finite_difference_lyapunov` — Benettin two-trajectory, finite-size exponent (seeds 001/002).
* :func:`tangent_spectrum` — top-k exponents of the linearized dynamics (forward-mode AD + QR),
  with the surrogate derivative in the Jacobian.
* :func:`depthwise_gain` — layer-to-layer growth of a perturbation within a step.
* :func:`analyze_dynamics` — one call, a :class:`DynamicsReport` with whatever was asked for.
* :func:`compute_lyap_reg_loss`, :class:`LyapunovRegularizer` — the ten penalty kinds of seed 002.
"""
from .finite_difference import FiniteDifferenceResult, finite_difference_lyapunov
from .regularizers import PENALTY_KINDS, LyapunovRegularizer, compute_lyap_reg_loss
from .tangent import TangentResult, tangent_spectrum
from .depth import DepthGainResult, depthwise_gain
from .analyze import DynamicsReport, analyze_dynamics

__all__ = [
    "FiniteDifferenceResult",
    "finite_difference_lyapunov",
    "PENALTY_KINDS",
    "LyapunovRegularizer",
    "compute_lyap_reg_loss",
    "TangentResult",
    "tangent_spectrum",
    "DepthGainResult",
    "depthwise_gain",
    "DynamicsReport",
    "analyze_dynamics",
]
