"""Finite-difference (Benettin two-trajectory) Lyapunov estimate for any stepper.

What it measures: the average per-step log-growth of a perturbation of *finite* size ``eps``
applied to the continuous state (membranes, synaptic currents) of the chosen layers, renormalized
back to size ``eps`` after every step. For smooth maps and small ``eps`` this converges to the
largest Lyapunov exponent. For spiking networks it is a *finite-size* exponent: spikes that flip
between the twins make it depend on ``eps`` (REFERENCES.md: +0.58 at eps=1e-1, -0.10 at eps=1e-4
on the same recurrent LIF net), so the result also reports how often spikes flipped.

Differences from the seeds, on purpose:

* the initial perturbation has norm ``eps`` per sample (the seeds drew ``eps * randn`` per element,
  whose norm is ``eps * sqrt(N)``, biasing the first step by ``ln sqrt(N)``);
* divergence is measured on exactly the tensors that are perturbed, never on spikes;
* renormalization is per sample (never across the batch), and log-growth is averaged over time per
  sample, then over samples (E[log], not log E);
* the twins share dropout masks and batch-norm statistics (steppers with ``supports_twins``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .._checks import check_fraction, check_positive, check_tensor
from ..dynamics import State, TwinLayout, select_layers, state_spec_of, unroll
from .precision import maybe_cast

RENORM_MODES = ("global", "per_layer")

# Smallest per-element perturbation, in units of the dtype's machine epsilon (at state scale ~1),
# below which the twin difference keeps fewer than ~6 significant bits.
_RESOLUTION_ULPS = 64


@dataclass
class FiniteDifferenceResult:
    """Outcome of :func:`finite_difference_lyapunov`.

    ``exponent``: scalar tensor, mean of ``per_sample``; differentiable (a loss term).
    ``per_sample``: ``(K,)`` time-averaged log-growth per estimated sample, in nats per step.
    ``sample_index``: ``(K,)`` the batch rows that were estimated (all rows unless ``fraction < 1``).
    ``flip_fraction``: fraction of (time step, sample) pairs in which any spike differed between
    twins (NaN for a stepper whose ``state_spec`` declares no spike state).
    ``outputs``: ``(T, B, ...)`` outputs of the nominal trajectory (the model's ordinary forward).
    """

    exponent: torch.Tensor
    per_sample: torch.Tensor
    sample_index: torch.Tensor
    flip_fraction: float
    eps: float
    renorm: str
    steps: int
    outputs: torch.Tensor
    state: State = field(repr=False)
    states: Optional[List[State]] = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.exponent.detach())

    def __str__(self) -> str:
        spread = float(self.per_sample.detach().std()) if self.per_sample.numel() > 1 else 0.0
        flips = "" if math.isnan(self.flip_fraction) else (
            f", spike flips in {self.flip_fraction:.1%} of steps")
        return (
            f"finite-size Lyapunov exponent {float(self):+.4f} /step "
            f"(+- {spread:.4f} over {self.per_sample.numel()} samples, eps={self.eps:g}, "
            f"{self.renorm} renorm, {self.steps} steps{flips})"
        )


def finite_difference_lyapunov(
    stepper,
    x: torch.Tensor,
    *,
    eps: float = 1e-4,
    layers: Optional[Sequence[int]] = None,
    renorm: str = "global",
    fraction: float = 1.0,
    twin_dtype: Optional[torch.dtype] = None,
    discard: int = 0,
    generator: Optional[torch.Generator] = None,
    record_states: bool = False,
) -> FiniteDifferenceResult:
    """Benettin two-trajectory estimate of the largest (finite-size) Lyapunov exponent.

    Args:
        stepper: any stepper (:mod:`stablespike.dynamics`).
        x: ``(T, B, ...)`` time-first input sequence.
        eps: perturbation norm per sample, over the concatenated perturbed state.
        layers: layer indices whose continuous state is perturbed and measured (negative counts
            from the last); default all (the seeds' ``lyap_layers``).
        renorm: ``"global"``: one scale per sample over all chosen layers (textbook Benettin);
            ``"per_layer"``: each layer's part rescaled to ``eps / sqrt(L)`` (seed 001's variant).
        fraction: estimate on a random ``ceil(fraction * B)`` rows only; the nominal trajectory
            still runs on all rows, so a regularized training step costs little more than a plain one.
        twin_dtype: e.g. ``torch.float64``: run both trajectories in that precision.
        discard: leading steps left out of the time average (transient).
        generator: seeds the perturbation direction and the sub-batch choice.
        record_states: keep the nominal state of every step in ``result.states``.
    """
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first")
    eps = check_positive(eps, "eps")
    fraction = check_fraction(fraction, "fraction")
    if renorm not in RENORM_MODES:
        raise ValueError(f"renorm: expected one of {RENORM_MODES}, got {renorm!r}")
    T, B = x.shape[0], x.shape[1]
    if not 0 <= int(discard) < T:
        raise ValueError(f"discard: expected an integer in [0, {T - 1}] (T={T}), got {discard!r}")
    twins = TwinLayout(B, _choose_rows(B, fraction, x.device, generator))

    with maybe_cast(stepper, twin_dtype) as run_stepper:
        dtype = twin_dtype or x.dtype
        state = tuple(run_stepper.init_state(B + twins.twins, x.device, dtype))
        spec = state_spec_of(run_stepper, state)
        chosen = select_layers(spec, layers)
        _warn_if_unresolved(eps, sum(state[i][0].numel() for i in chosen), dtype)
        tracker = _Tracker(twins, spec, chosen, eps, renorm, discard)
        state = tracker.perturb(state, generator)
        run = unroll(run_stepper, x.to(dtype), state, twins=twins, on_step=tracker,
                     record_states=record_states)

    tracker.warn_if_collapsed()
    per_sample = (tracker.log_growth / (T - discard)).to(x.dtype)
    outputs = run.outputs.to(x.dtype)
    return FiniteDifferenceResult(
        exponent=per_sample.mean(), per_sample=per_sample, sample_index=twins.index,
        flip_fraction=tracker.flip_fraction(T), eps=eps, renorm=renorm,
        steps=T - discard, outputs=outputs, state=run.state, states=run.states,
    )


def _choose_rows(batch: int, fraction: float, device, generator) -> torch.Tensor:
    """The rows that get a twin: all of them, or a random sorted subset of ceil(fraction * B)."""
    k = max(1, math.ceil(fraction * batch))
    if k >= batch:
        return torch.arange(batch, device=device)
    perm = torch.randperm(batch, generator=generator, device="cpu")[:k]
    return perm.sort().values.to(device)


def _warn_if_unresolved(eps: float, n_perturbed: int, dtype: torch.dtype) -> None:
    per_element = eps / math.sqrt(max(1, n_perturbed))
    floor = _RESOLUTION_ULPS * torch.finfo(dtype).eps
    if per_element < floor:
        warnings.warn(
            f"eps={eps:g} spread over {n_perturbed} state values is {per_element:.1e} per value, "
            f"below what {dtype} resolves at membrane scale (~{floor:.1e}): the twin difference is "
            "quantized. Use twin_dtype=torch.float64 or a larger eps.",
            RuntimeWarning, stacklevel=3,
        )


class _Tracker:
    """Perturbs the twins, then after each step measures, accumulates and renormalizes."""

    def __init__(self, twins: TwinLayout, spec, chosen, eps, renorm, discard):
        self.twins, self.chosen, self.eps, self.renorm, self.discard = twins, chosen, eps, renorm, discard
        self.spikes = tuple(i for i, s in enumerate(spec) if s.kind == "spike")
        layer_of = [spec[i].layer for i in chosen]
        self.groups = [[i for i, l in zip(chosen, layer_of) if l == layer] for layer in sorted(set(layer_of))]
        self.log_growth = None
        self.flips = torch.zeros((), dtype=torch.long, device=twins.index.device)
        self.collapsed = torch.zeros((), dtype=torch.bool, device=twins.index.device)

    def perturb(self, state: State, generator) -> State:
        """Twin rows := their nominal rows + a random direction of norm eps (per sample)."""
        tw = self.twins
        directions = {
            i: torch.randn(state[i][tw.batch:].shape, generator=generator, device="cpu",
                           dtype=state[i].dtype).to(state[i].device)
            for i in self.chosen
        }
        return self._set_twins(state, directions)

    def _set_twins(self, state: State, diffs: dict) -> State:
        """Rescale ``diffs`` (per sample, per renorm mode) to norm eps and rebuild the twin rows."""
        tw, out = self.twins, list(state)
        groups = [self.chosen] if self.renorm == "global" else self.groups
        target = self.eps / math.sqrt(len(groups))
        for group in groups:
            norm = _norm(_row_sq([diffs[i] for i in group]))
            scale = target / norm
            for i in group:
                d = diffs[i] * scale.view(-1, *([1] * (diffs[i].dim() - 1)))
                out[i] = torch.cat([tw.nominal(state[i]), tw.partner(state[i]) + d], dim=0)
        return tuple(out)

    def __call__(self, t: int, out_t: torch.Tensor, state: State) -> State:
        tw = self.twins
        diffs = {i: tw.twin(state[i]) - tw.partner(state[i]) for i in self.chosen}
        sq = _row_sq(list(diffs.values()))
        self.collapsed |= (sq <= torch.finfo(sq.dtype).tiny).any()
        growth = torch.log(_norm(sq) / self.eps)  # (K,)
        if t >= self.discard:
            self.log_growth = growth if self.log_growth is None else self.log_growth + growth
        if self.spikes:
            self._count_flips(state)
        return self._set_twins(state, diffs)

    @torch.no_grad()
    def _count_flips(self, state: State) -> None:
        tw = self.twins
        flipped = torch.zeros(tw.twins, dtype=torch.bool, device=tw.index.device)
        for i in self.spikes:
            flipped |= (tw.twin(state[i]) != tw.partner(state[i])).flatten(1).any(dim=1)
        self.flips += flipped.sum()

    def flip_fraction(self, steps: int) -> float:
        """Flipped (step, sample) pairs over all pairs; NaN when the stepper declares no spikes."""
        if not self.spikes:
            return float("nan")
        return int(self.flips) / (steps * self.twins.twins)

    def warn_if_collapsed(self) -> None:
        if bool(self.collapsed):
            warnings.warn(
                "the twin trajectories coincided exactly for some samples (zero divergence): eps "
                "is too small for this dtype, or the chosen layers do not depend on their state. "
                "Their log-growth was floored.",
                RuntimeWarning, stacklevel=3,
            )


def _row_sq(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Per-row squared Euclidean norm over several ``(K, ...)`` tensors together, ``(K,)``."""
    return sum(t.pow(2).flatten(1).sum(dim=1) for t in tensors)


def _norm(sq: torch.Tensor) -> torch.Tensor:
    """``sqrt(sq)`` floored above 0, so that log and division stay finite (and differentiable)."""
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
