"""Stability over training (seed 000's API and meaning): StabilityMetrics, StabilityMonitor,
gradient singular values, spectral radius, trends and a diagnosis.

The firing statistics are the :class:`~stablespike.stats.FiringRate` accumulator, the thresholds
one :class:`~stablespike.rules.Thresholds` (dead and saturated rates included: the profiler's), and
the verdicts the rules of :mod:`stablespike.rules` (chaos > 0.5, over-stable < -0.5, condition
number, trends), so the profiler and this monitor never count or judge differently.

Gradient figures here are about *parameter* gradients: ``grad_norm`` is the parameter gradient
norm of :func:`stablespike.stats.parameter_gradient_norm` (what ``clip_grad_norm_`` clips; the
trend rule reads it), not the per-layer gradient norm the profiler records.

Conditioning: weight gradients are rank-deficient by nature (a batch of B samples over T steps
gives at most B x T directions; dead units and constant inputs give exact zeros), so seed 000's
``grad_condition`` = largest / (smallest + 1e-12) is 1e7-1e15 on healthy models and changes with
float rounding (batch order). It stays available, but the alarm reads ``grad_condition_eff``, the
condition number over the numerical rank (:func:`effective_condition`): largest singular value
over the smallest one above numpy's ``matrix_rank`` tolerance ``max(M, N) x eps x largest``, eps
of the gradient's dtype. Values below that tolerance are rounding, not directions, so the
statistic is deterministic to rounding; in float32 it cannot exceed ``1 / (max(M, N) x eps)``.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Deque, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ._checks import describe
from .rules import Thresholds, condition_number, gradient_trend, lyapunov_regime
from .stats import FiringRate, parameter_gradient_norm


@dataclass
class StabilityMetrics:
    """One measurement; fields left None were not measured."""

    lyapunov: Optional[float] = None
    grad_norm: Optional[float] = None
    grad_max_sv: Optional[float] = None
    grad_min_sv: Optional[float] = None
    grad_condition: Optional[float] = None  # seed 000's largest / (smallest + 1e-12), layer mean
    grad_condition_eff: Optional[float] = None  # over the numerical rank, worst layer (the alarm's)
    firing_rate_mean: Optional[float] = None
    firing_rate_std: Optional[float] = None
    dead_neuron_frac: Optional[float] = None
    saturated_neuron_frac: Optional[float] = None
    membrane_mean: Optional[float] = None
    membrane_std: Optional[float] = None

    def to_dict(self) -> Dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        parts = []
        if self.lyapunov is not None:
            parts.append(f"λ={self.lyapunov:.4f}")
        if self.grad_norm is not None:
            parts.append(f"∇={self.grad_norm:.4f}")
        if self.grad_condition_eff is not None:
            parts.append(f"κ_eff={self.grad_condition_eff:.2e}")
        if self.firing_rate_mean is not None:
            parts.append(f"fr={self.firing_rate_mean:.3f}±{self.firing_rate_std:.3f}")
        if self.dead_neuron_frac is not None:
            parts.append(f"dead={self.dead_neuron_frac:.1%}")
        if self.saturated_neuron_frac is not None:
            parts.append(f"sat={self.saturated_neuron_frac:.1%}")
        return " | ".join(parts)


def gradient_norm(model: nn.Module) -> float:
    """The parameter gradient norm: total 2-norm of all parameter gradients (0.0 when there are
    none); :func:`stablespike.stats.parameter_gradient_norm`."""
    return parameter_gradient_norm(model)


def _gradient_spectra(model: nn.Module) -> Dict[str, np.ndarray]:
    """All singular values of every finite 2-D weight gradient, descending."""
    return {name: torch.linalg.svdvals(p.grad.detach().double().cpu()).numpy()
            for name, p in model.named_parameters()
            if p.grad is not None and p.grad.dim() == 2 and bool(torch.isfinite(p.grad).all())}


def _rank_tolerance(model: nn.Module) -> Dict[str, float]:
    """Per 2-D weight gradient: numpy's matrix_rank relative tolerance, max(M, N) x eps."""
    return {name: max(p.grad.shape) * torch.finfo(p.grad.dtype).eps
            for name, p in model.named_parameters() if p.grad is not None and p.grad.dim() == 2}


def effective_condition(sv: np.ndarray, rtol: float) -> float:
    """Condition number over the numerical rank: ``sv[0] / sv[r - 1]`` where ``r`` counts the
    singular values above ``rtol x sv[0]`` (``sv`` descending). 1.0 for a rank-1 (or zero)
    gradient. ``rtol``: ``max(M, N) x eps`` of the gradient's dtype (numpy's matrix_rank rule)."""
    sv = np.asarray(sv, dtype=np.float64)
    if sv.size == 0 or not sv[0] > 0:
        return 1.0
    rank = int((sv > rtol * sv[0]).sum())
    return float(sv[0] / sv[max(rank, 1) - 1])


def _condition(sv: np.ndarray) -> float:
    """Seed 000's condition number, largest / (smallest + 1e-12): finite for rank-deficient
    gradients (dead units give zero singular values), huge instead of inf."""
    return float(sv[0] / (sv[-1] + 1e-12))


def gradient_singular_values(model: nn.Module, top_k: int = 5) -> Dict[str, Tuple[np.ndarray, float]]:
    """Per 2-D weight gradient: its ``top_k`` largest singular values and its condition number
    (largest / (smallest + 1e-12) singular value, as seed 000)."""
    return {name: (sv[:top_k], _condition(sv)) for name, sv in _gradient_spectra(model).items()}


def compute_spectral_radius(weight_matrix: torch.Tensor) -> float:
    """Largest eigenvalue modulus of a square matrix (> 1 can destabilize a recurrent layer)."""
    if weight_matrix.dim() != 2 or weight_matrix.shape[0] != weight_matrix.shape[1]:
        raise ValueError(f"weight_matrix: expected a square 2-D tensor, got shape {tuple(weight_matrix.shape)}")
    eig = torch.linalg.eigvals(weight_matrix.detach().double().cpu())
    return float(eig.abs().max())


def analyze_weight_spectrum(model: nn.Module) -> Dict[str, float]:
    """Spectral radius of every square 2-D weight (recurrent matrices) of ``model``."""
    return {name: compute_spectral_radius(p) for name, p in model.named_parameters()
            if "weight" in name and p.dim() == 2 and p.shape[0] == p.shape[1]}


class StabilityMonitor:
    """Tracks the Lyapunov exponent, gradient norm and firing rate over training.

    Histories are bounded (``history_size`` entries each); ``get_trends()`` compares the mean of
    the last 10 entries with the first 10, and ``diagnose()`` writes the verdict.
    """

    def __init__(self, dead_threshold: Optional[float] = None, saturated_threshold: Optional[float] = None,
                 history_size: int = 100, thresholds: Optional[Thresholds] = None):
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 10:
            raise ValueError(f"history_size: expected an integer >= 10 (trends compare 10 entries), "
                             f"got {history_size!r}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds: expected a Thresholds or None, got {type(thresholds).__name__}")
        changes = {}  # seed 000's two arguments are the shared thresholds' dead and saturated rates
        if dead_threshold is not None:
            changes["dead_rate"] = dead_threshold
        if saturated_threshold is not None:
            changes["saturated_rate"] = saturated_threshold
        try:
            self.thresholds = (thresholds or Thresholds()).replace(**changes)
        except ValueError as err:
            arg = "dead_threshold" if "dead_rate" in str(err) else "saturated_threshold"
            raise ValueError(f"{arg}: {err}") from None
        self.history_size = history_size
        self.lyap_history: Deque[float] = collections.deque(maxlen=history_size)
        self.grad_history: Deque[float] = collections.deque(maxlen=history_size)
        self.fr_history: Deque[float] = collections.deque(maxlen=history_size)
        self.last: Optional[StabilityMetrics] = None

    @property
    def dead_threshold(self) -> float:
        return self.thresholds.dead_rate

    @property
    def saturated_threshold(self) -> float:
        return self.thresholds.saturated_rate

    # seed 000 method names
    def compute_gradient_norm(self, model: nn.Module) -> float:
        return gradient_norm(model)

    def compute_gradient_singular_values(self, model: nn.Module, top_k: int = 5):
        return gradient_singular_values(model, top_k)

    def get_aggregate_gradient_sv(self, model: nn.Module) -> Tuple[float, float, float]:
        """(largest singular value, smallest singular value, mean raw condition number) over
        layers, as seed 000 (the raw number; the alarm reads :meth:`effective_condition`)."""
        spectra = _gradient_spectra(model)
        if not spectra:
            return 0.0, 0.0, 1.0
        return (float(max(sv[0] for sv in spectra.values())), float(min(sv[-1] for sv in spectra.values())),
                float(np.mean([_condition(sv) for sv in spectra.values()])))

    def effective_condition(self, model: nn.Module) -> float:
        """The worst layer's condition number over the numerical rank (module docstring)."""
        spectra, rtol = _gradient_spectra(model), _rank_tolerance(model)
        return max((effective_condition(sv, rtol[name]) for name, sv in spectra.items()), default=1.0)

    def compute_firing_stats(self, spikes: torch.Tensor) -> Tuple[float, float, float, float]:
        """(mean rate, std over neurons, dead fraction, saturated fraction) of ``spikes`` shaped
        ``(B, T, H)`` (seed recordings), ``(T, H)`` or ``(H,)``: every leading dimension is averaged."""
        if not isinstance(spikes, torch.Tensor):
            raise TypeError(f"spikes: expected a torch.Tensor (B, T, H), (T, H) or (H,), got {describe(spikes)}")
        acc = FiringRate()
        s = spikes.detach()
        s = s.unsqueeze(0) if s.dim() == 1 else s
        acc.update(s, multistep=s.dim() >= 3)
        rates = acc.compute().reshape(-1)
        return (float(rates.mean()), float(rates.std()) if rates.numel() > 1 else 0.0,
                float((rates < self.thresholds.dead_rate).double().mean()),
                float((rates > self.thresholds.saturated_rate).double().mean()))

    def compute_membrane_stats(self, membrane: torch.Tensor) -> Tuple[float, float]:
        if not isinstance(membrane, torch.Tensor):
            raise TypeError(f"membrane: expected a torch.Tensor, got {describe(membrane)}")
        m = membrane.detach().double()
        return float(m.mean()), float(m.std()) if m.numel() > 1 else 0.0

    def compute(self, model: nn.Module, lyapunov=None, spikes: Optional[torch.Tensor] = None,
                membrane: Optional[torch.Tensor] = None, compute_sv: bool = False) -> StabilityMetrics:
        """Measure what is given (call after ``loss.backward()`` for gradient figures)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {describe(model)}")
        m = StabilityMetrics()
        if lyapunov is not None:
            m.lyapunov = float(lyapunov.detach()) if isinstance(lyapunov, torch.Tensor) else float(lyapunov)
            self.lyap_history.append(m.lyapunov)
        m.grad_norm = gradient_norm(model)
        self.grad_history.append(m.grad_norm)
        if compute_sv:
            m.grad_max_sv, m.grad_min_sv, m.grad_condition = self.get_aggregate_gradient_sv(model)
            m.grad_condition_eff = self.effective_condition(model)
        if spikes is not None:
            (m.firing_rate_mean, m.firing_rate_std, m.dead_neuron_frac,
             m.saturated_neuron_frac) = self.compute_firing_stats(spikes)
            self.fr_history.append(m.firing_rate_mean)
        if membrane is not None:
            m.membrane_mean, m.membrane_std = self.compute_membrane_stats(membrane)
        self.last = m
        return m

    def get_trends(self) -> Dict[str, str]:
        trends = {}
        lyap, grads, fr = list(self.lyap_history), list(self.grad_history), list(self.fr_history)
        if len(lyap) >= 10:
            recent, older = np.mean(lyap[-10:]), np.mean(lyap[:10])
            trends["lyapunov"] = ("INCREASING (becoming unstable)" if recent > older + 0.1 else
                                  "DECREASING (stabilizing)" if recent < older - 0.1 else "STABLE")
        if len(grads) >= 10:
            found = gradient_trend(grads, self.thresholds)
            trends["gradients"] = ("STABLE" if found is None else
                                   "EXPLODING" if "exploding" in found.category else "VANISHING")
        if len(fr) >= 10:
            recent = np.mean(fr[-10:])
            trends["firing"] = ("DEAD NETWORK" if recent < self.thresholds.dead_rate else
                                "SATURATED" if recent > self.thresholds.saturated_rate else "HEALTHY")
        return trends

    def diagnose(self) -> str:
        """A short verdict on the recent history (last 20 entries), with the numbers."""
        trends, lines = self.get_trends(), ["=== Stability Diagnosis ==="]
        if self.lyap_history:
            avg = float(np.mean(list(self.lyap_history)[-20:]))
            regime = lyapunov_regime(avg, self.thresholds)
            lines.append(f"Lyapunov exponent: {avg:.4f}")
            lines.append({"chaotic_dynamics": " → Network is CHAOTIC (trajectories diverge quickly)",
                          "over_stable_dynamics": " → Network is OVER-STABLE (trajectories collapse)",
                          "edge_of_chaos": " → Network is at EDGE OF CHAOS (good for learning)"}[regime.category])
            if regime.suggestion != "none needed":
                lines.append(f" → Suggestion: {regime.suggestion}")
            if "lyapunov" in trends:
                lines.append(f" → trend: {trends['lyapunov']}")
        if self.grad_history:
            history = list(self.grad_history)
            bad = [i for i, g in enumerate(history) if not np.isfinite(g)]
            recent = [g for g in history[-20:] if np.isfinite(g)]
            if recent:
                lines.append(f"Gradient norm: avg={np.mean(recent):.4f}, max={max(recent):.4f}")
            if bad:
                lines.append(f" → CRITICAL: NaN/inf parameter gradient norm in {len(bad)} of the last "
                             f"{len(history)} measurements, first at measurement {bad[0]}; check for "
                             "NaN weights or inputs, clip gradients and lower the learning rate")
            elif "gradients" in trends:
                lines.append(f" → {trends['gradients']}")
        cond = condition_number(self.last.grad_condition_eff if self.last else None, self.thresholds)
        if cond is not None:
            lines.append(f" → {cond.message}; {cond.suggestion}")
        if self.fr_history:
            lines.append(f"Firing rate: {np.mean(list(self.fr_history)[-20:]):.4f}")
            if "firing" in trends:
                lines.append(f" → {trends['firing']}")
        return "\n".join(lines)
