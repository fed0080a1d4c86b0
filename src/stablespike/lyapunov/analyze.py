"""One entry point: the stability quantities of a model on a batch, in one small result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..neurons import find_layers
from .depth import DepthGainResult, depthwise_gain
from .finite_difference import FiniteDifferenceResult, RunState, finite_difference_lyapunov
from .tangent import TangentResult, tangent_spectrum


@dataclass
class DynamicsReport:
    """Whatever was asked for: ``finite_difference`` (finite-size exponent, depends on eps),
    ``tangent`` (top-k surrogate-Jacobian spectrum), ``depth`` (layer-to-layer gain)."""

    finite_difference: Optional[FiniteDifferenceResult] = None
    tangent: Optional[TangentResult] = None
    depth: Optional[DepthGainResult] = None

    def __str__(self) -> str:
        parts = [str(p) for p in (self.finite_difference, self.tangent, self.depth) if p is not None]
        return "\n".join(parts) if parts else "nothing was measured"


def analyze_dynamics(model, x: torch.Tensor, *, forward: Optional[Callable] = None,
                     batch_dim: int = 1, eps: Optional[float] = 1e-4, k: int = 0,
                     depth: bool = False, t_ons: int = 1, discard: int = 0,
                     generator: Optional[torch.Generator] = None) -> DynamicsReport:
    """Measure a model on a batch: a module with spiking neurons (yours or the library's), run
    through ``forward(model, x)`` (default ``model(x)``) with the samples along ``batch_dim``, or
    a stepper over a time-first ``x (T, B, ...)``.

    ``eps``: finite-difference exponent at that perturbation size (None: skip); ``k``: top-k
    tangent spectrum (0: skip); ``depth``: depth-wise gain (feedforward depth). No gradients are
    kept: this is for looking, the estimators themselves are the differentiable loss terms.
    Each measurement runs the model; a module is left as after the first of them, as after one
    plain call (batch-norm statistics updated once, the state its neurons keep, random state).
    """
    how = {"forward": forward, "batch_dim": batch_dim, "generator": generator}
    report = DynamicsReport()
    after_first = []  # the model's state after the first measurement, restored after the others

    def measured(run):
        if after_first:
            try:
                return run()
            finally:
                after_first[0].restore()
        result = run()
        if isinstance(model, nn.Module) and isinstance(x, torch.Tensor):
            after_first.append(RunState(model, find_layers(model), x, generator))
        return result

    if eps is not None:
        with torch.no_grad():
            report.finite_difference = measured(
                lambda: finite_difference_lyapunov(model, x, eps=eps, discard=discard, **how))
    if k:
        with torch.enable_grad():  # forward-mode AD; detached below
            report.tangent = measured(lambda: tangent_spectrum(model, x, k=k, t_ons=t_ons, discard=discard, **how))
        report.tangent.exponents = report.tangent.exponents.detach()
        report.tangent.per_sample = report.tangent.per_sample.detach()
    if depth:
        report.depth = measured(lambda: depthwise_gain(model, x, **how))
        report.depth.per_layer = report.depth.per_layer.detach()
        report.depth.per_sample = report.depth.per_sample.detach()
    return report
