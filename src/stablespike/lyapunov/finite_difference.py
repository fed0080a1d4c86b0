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

from .._checks import check_fraction, check_positive, check_tensor, user_stacklevel
from ..dynamics import State, TwinLayout, initial_state, select_layers, state_spec_of, unroll
from .precision import maybe_cast
from .renorm import Renormalizer

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
    renorm_every: int = 1,
    count_flips: bool = True,
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
        discard: leading steps left out of the time average (transient); with ``renorm_every > 1``
            rounded up to the start of a renormalization interval.
        renorm_every: measure and renormalize every this many steps (and at the last step) instead
            of every step, as Benettin's interval tau. Identical for linear dynamics; for spiking
            nets the perturbation may grow up to ``eps * exp(lambda * renorm_every)`` in between,
            which changes the finite-size exponent a little. Fewer operations per step.
        count_flips: count spike flips between twins (a diagnostic; off saves a few operations).
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
    if int(renorm_every) != renorm_every or renorm_every < 1:
        raise ValueError(f"renorm_every: expected an integer >= 1, got {renorm_every!r}")
    if -(-int(discard) // int(renorm_every)) * int(renorm_every) >= T:
        raise ValueError(
            f"discard: {discard} leaves no whole renormalization interval of {renorm_every} steps "
            f"in T={T} steps")
    rows = _choose_rows(B, fraction, x.device, generator)

    with maybe_cast(stepper, twin_dtype) as run_stepper:
        # steppers that can carry their twins as differences do (cheaper: twin_differences.py)
        differences = bool(getattr(run_stepper, "supports_twin_differences", False))
        twins = TwinLayout(B, rows, differences=differences)
        dtype = twin_dtype or x.dtype
        state = initial_state(run_stepper, B, twins, x.device, dtype)
        spec = state_spec_of(run_stepper, state[:len(state) // 2] if twins.differences else state)
        chosen = select_layers(spec, layers)
        if not twins.differences:  # a difference carried as such keeps its own precision
            _warn_if_unresolved(eps, sum(state[i][0].numel() for i in chosen), dtype)
        # steppers that never save their state for backward let the twin rows be rewritten in place
        inplace = bool(getattr(run_stepper, "twin_state_inplace", False))
        tracker = _Tracker(twins, spec, chosen, eps, renorm, discard, int(renorm_every), T,
                           count_flips, inplace)
        state = tracker.perturb(state, generator)
        run = unroll(run_stepper, x.to(dtype), state, twins=twins, on_step=tracker,
                     record_states=record_states)

    per_sample = (tracker.log_growth() / tracker.counted_steps).to(x.dtype)
    outputs = run.outputs.to(x.dtype)
    return FiniteDifferenceResult(
        exponent=per_sample.mean(), per_sample=per_sample, sample_index=twins.index,
        flip_fraction=tracker.flip_fraction(T), eps=eps, renorm=renorm,
        steps=tracker.counted_steps, outputs=outputs, state=run.state, states=run.states,
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
            RuntimeWarning, stacklevel=user_stacklevel(),
        )


class _Tracker:
    """Perturbs the twins, then after each step (or interval) measures and renormalizes."""

    def __init__(self, twins: TwinLayout, spec, chosen, eps, renorm, discard, every, steps,
                 count_flips, inplace):
        self.twins, self.chosen, self.eps = twins, chosen, eps
        # where the perturbed tensors sit in the state: their twin rows, or their differences
        self.offset = len(spec) if twins.differences else 0
        self.discard, self.every, self.last = discard, every, steps - 1
        self.spikes = tuple(i for i, s in enumerate(spec) if s.kind == "spike") if count_flips else ()
        if renorm == "global":
            self.groups = [tuple(range(len(chosen)))]
        else:  # one group per layer; positions into ``chosen``
            layers = sorted({spec[i].layer for i in chosen})
            self.groups = [tuple(k for k, i in enumerate(chosen) if spec[i].layer == layer)
                           for layer in layers]
        # each group's share of the norm eps
        self.renormalize = Renormalizer(twins, self.groups, eps / math.sqrt(len(self.groups)), inplace)
        self.norms = []  # (K,) divergence at the end of each counted interval
        self.counted_steps = 0
        self.interval_start = 0
        self.flips = []

    def perturb(self, state: State, generator) -> State:
        """Twins := their nominal rows + a random direction of norm eps (per sample)."""
        tw, out = self.twins, list(state)
        for i in self.chosen:
            shape = (tw.twins,) + tuple(state[i].shape[1:])
            noise = torch.randn(shape, generator=generator, device="cpu", dtype=state[i].dtype)
            noise = noise.to(state[i].device)
            if tw.differences:
                out[self.offset + i] = noise
            else:
                out[i] = torch.cat([tw.nominal(state[i]), tw.partner(state[i]) + noise])
        return self._renormalize(tuple(out))[0]

    def _renormalize(self, state: State):
        norm, new = self.renormalize([state[self.offset + i] for i in self.chosen])
        out = list(state)
        for i, s in zip(self.chosen, new):
            out[self.offset + i] = s
        return tuple(out), norm

    def __call__(self, t: int, out_t: torch.Tensor, state: State) -> State:
        if self.spikes:
            self._count_flips(state)
        if (t + 1) % self.every and t != self.last:
            return state  # inside a renormalization interval
        state, norm = self._renormalize(state)
        if self.interval_start >= self.discard:
            self.norms.append(norm)  # reduced once at the end: no per-step log
            self.counted_steps += t + 1 - self.interval_start
        self.interval_start = t + 1
        return state

    def log_growth(self) -> torch.Tensor:
        """Sum over counted intervals of ``ln(divergence / eps)`` per sample, ``(K,)``."""
        norms = torch.stack(self.norms)  # (intervals, K)
        if bool(norms.detach().amin() <= torch.finfo(norms.dtype).tiny):
            warnings.warn(
                "the twin trajectories coincided exactly for some samples (zero divergence): eps "
                "is too small for this dtype, or the chosen layers do not depend on their state. "
                "Their log-growth was floored.",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )
        return norms.log().sum(dim=0) - len(self.norms) * math.log(self.eps)

    @torch.no_grad()
    def _count_flips(self, state: State) -> None:
        tw = self.twins
        if tw.differences:
            differ = [state[self.offset + i].ne(0).flatten(1) for i in self.spikes]
        else:
            differ = [(tw.twin(state[i]) != tw.partner(state[i])).flatten(1) for i in self.spikes]
        self.flips.append(torch.cat(differ, dim=1).any(dim=1).sum())

    def flip_fraction(self, steps: int) -> float:
        """Flipped (step, sample) pairs over all pairs; NaN when the stepper declares no spikes."""
        if not self.spikes:
            return float("nan")
        return int(torch.stack(self.flips).sum()) / (steps * self.twins.twins)

