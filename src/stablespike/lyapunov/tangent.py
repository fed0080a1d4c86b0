"""Tangent-space Lyapunov spectrum: k tangent vectors pushed through a stepper by forward-mode AD,
re-orthonormalized by QR every ``t_ons`` steps (Benettin / Shimada-Nagashima).

What it measures: the top-k exponents of the *linearized* dynamics, i.e. of the Jacobian of one
step. For a spiking model that Jacobian is taken with the surrogate spike derivative that its
backward pass uses (the stepper's spike function must define ``jvp``, as
``stablespike.fast_sigmoid`` does), so these are "surrogate Lyapunov exponents": they depend on the
weights through the surrogate, unlike the finite-size exponent, which moves only through spike
flips. Below threshold everywhere, both give ``ln(beta)``.

The k tangents run as k copies of the batch (rows ``B * k``) in one pass. Spike state
components carry tangents too (a recurrent layer feeds its spikes back), but only continuous
components are orthonormalized and measured; the others follow the same change of basis.
The estimate is differentiable (QR included), so ``(exponents ** 2).sum()`` can be a loss term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.autograd.forward_ad as fwAD

from .._checks import check_generator, check_int, check_tensor
from ..degenerate import FlooredLog, warn_degenerate
from ..dynamics import state_spec_of, unroll
from .drivers import call_model, check_batch_dim, require_stepper, uses_neurons
from .tangent_modules import module_tangents
from ..twins import TwinRows, drawing_aside


@dataclass
class TangentResult:
    """``exponents``: ``(k,)`` mean over samples, largest first (nats per step); ``per_sample``:
    ``(B, k)``; ``history``: ``(n, k)`` running estimate after each counted QR; ``convergence``:
    largest change of the running estimate over the last quarter of the run."""

    exponents: torch.Tensor
    per_sample: torch.Tensor
    steps: int
    history: torch.Tensor = field(repr=False)
    convergence: float = math.nan

    def __str__(self) -> str:
        shown = ", ".join(f"{float(v):+.4f}" for v in self.exponents.detach()[:8])
        more = "" if self.exponents.numel() <= 8 else f", ... ({self.exponents.numel()} in all)"
        return (f"tangent Lyapunov spectrum [{shown}{more}] /step over {self.steps} steps, "
                f"{self.per_sample.shape[0]} samples (convergence {self.convergence:.1e})")


def tangent_spectrum(model, x: torch.Tensor, *, k: int = 1, forward: Optional[Callable] = None,
                     batch_dim: int = 1, t_ons: int = 1, discard: int = 0,
                     generator: Optional[torch.Generator] = None) -> TangentResult:
    """Top-``k`` Lyapunov exponents of ``model`` driven by ``x``.

    ``model``: a module with spiking neurons, run through ``forward(model, x)`` (default
    ``model(x)``) with the samples of ``x`` along ``batch_dim`` (see
    :mod:`stablespike.lyapunov.tangent_modules`; the first step's state is where the tangents
    start); or a stepper, unrolled over a time-first ``x (T, B, ...)``.
    ``t_ons``: steps between orthonormalizations; ``discard``: leading steps whose growth is left
    out (transient); ``generator``: seeds the initial tangent basis.
    """
    k, t_ons, discard = check_int(k, "k"), check_int(t_ons, "t_ons"), check_int(discard, "discard", 0)
    check_generator(generator)
    if uses_neurons(model, forward):
        batch_dim = check_batch_dim(x, batch_dim)
        with drawing_aside(generator) as generator:  # the model's own draws stay a plain call's
            exponents, per_sample, steps, history, log = module_tangents(
                model, x, forward or call_model, batch_dim, int(k), int(t_ons), int(discard), generator)
        warn_tangent(per_sample, log, int(t_ons))
        return TangentResult(exponents, per_sample, steps, history, _convergence(history))
    require_stepper(model)
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first", floating=True)
    T, B = x.shape[0], x.shape[1]
    if discard >= T:
        raise ValueError(f"discard: expected an integer in [0, {T - 1}] (T={T}), got {discard!r}")
    stepper = model
    state = stepper.init_state(B, x.device, x.dtype)
    if not isinstance(state, tuple) or not all(isinstance(s, torch.Tensor) for s in state):
        raise TypeError(f"init_state: expected a tuple of tensors, got {type(state).__name__}")
    spec = state_spec_of(stepper, state)
    tracked = tuple(i for i, s in enumerate(spec) if s.continuous)
    n = sum(state[i][0].numel() for i in tracked)
    if k > n:
        raise ValueError(f"k: expected at most the continuous state dimension {n}, got {k}")
    if k > 1:  # the k copies of the batch start from the same state and see the same input
        copies = TwinRows(B, torch.arange(B, device=x.device).repeat(k - 1))
        state, x = tuple(copies.extend(s) for s in state), copies.extend(x, dim=1)
    tracker = _QRTracker(state, tracked, B, k, t_ons, discard, T, generator)
    with fwAD.dual_level():
        run = unroll(stepper, x, tracker.start(state), on_step=tracker)
    del run
    return tracker.result()


class _QRTracker:
    """Holds the tangent basis between steps: unpacks, orthonormalizes, re-packs as dual tensors."""

    def __init__(self, state, tracked, B, k, t_ons, discard, T, generator):
        self.tracked, self.B, self.k, self.t_ons, self.discard, self.T = tracked, B, k, t_ons, discard, T
        self.sizes = [state[i][0].numel() for i in tracked]
        self.shapes = [s.shape[1:] for s in state]
        n = sum(self.sizes)
        g = torch.randn(B, n, k, generator=generator, dtype=torch.float64).to(state[0].dtype)
        self.q = torch.linalg.qr(g.to(state[0].device))[0]  # (B, n, k) orthonormal columns
        self.log_sum = None  # (B, k)
        self.counted = 0
        self.interval_start = 0
        self.history: List[torch.Tensor] = []
        self.log = FlooredLog()

    def start(self, state):
        """The initial state as dual tensors: tracked components carry the basis, others zero."""
        return self._dual(state, self._columns_to_rows(self.q), {})

    def _columns_to_rows(self, q: torch.Tensor) -> dict:
        """``(B, n, k)`` -> per tracked component a ``(k * B, *shape)`` tangent (column-major rows)."""
        out, offset = {}, 0
        for i, size in zip(self.tracked, self.sizes):
            block = q[:, offset: offset + size, :]  # (B, size, k)
            out[i] = block.permute(2, 0, 1).reshape(self.k * self.B, *self.shapes[i])
            offset += size
        return out

    def _dual(self, state, tangents: dict, extra: dict):
        duals = []
        for i, s in enumerate(state):
            t = tangents.get(i, extra.get(i))
            duals.append(fwAD.make_dual(s, t if t is not None else torch.zeros_like(s)))
        return tuple(duals)

    def __call__(self, t: int, out_t, state):
        primal, tangent = zip(*(fwAD.unpack_dual(s) for s in state))
        tangent = [tg if tg is not None else torch.zeros_like(p) for p, tg in zip(primal, tangent)]
        if (t + 1) % self.t_ons and t != self.T - 1:
            return self._dual(primal, dict(enumerate(tangent)), {})
        y = torch.cat([tangent[i].reshape(self.k, self.B, -1) for i in self.tracked], dim=2)  # (k, B, n)
        y = y.permute(1, 2, 0)  # (B, n, k)
        q, r = torch.linalg.qr(y)
        diag = torch.diagonal(r, dim1=-2, dim2=-1)  # (B, k)
        if self.interval_start >= self.discard:
            growth = self.log(diag.abs())
            self.log_sum = growth if self.log_sum is None else self.log_sum + growth
            self.counted += t + 1 - self.interval_start
            self.history.append((self.log_sum / self.counted).mean(0).detach())
        self.interval_start = t + 1
        # untracked components (spikes) follow the same change of basis: x -> x R^-1
        extra = {}
        untracked = [i for i in range(len(state)) if i not in self.tracked]
        for i in untracked:
            ti = tangent[i].reshape(self.k, self.B, -1).permute(1, 2, 0)  # (B, m, k)
            solved = torch.linalg.solve_triangular(r, ti, upper=True, left=False)
            extra[i] = solved.permute(2, 0, 1).reshape(self.k * self.B, *self.shapes[i])
        return self._dual(primal, self._columns_to_rows(q), extra)

    def result(self) -> TangentResult:
        if self.log_sum is None:
            raise ValueError("discard: no orthonormalization was counted; lower discard or t_ons")
        per_sample = self.log_sum / self.counted  # (B, k)
        history = torch.stack(self.history)
        warn_tangent(per_sample, self.log, self.t_ons)
        return TangentResult(per_sample.mean(0), per_sample, self.counted, history, _convergence(history))


def warn_tangent(per_sample: torch.Tensor, log: FlooredLog, t_ons: int) -> None:
    warn_degenerate("tangent_spectrum", per_sample, log,
                    f"Lower t_ons (got {t_ons}) or use float64.",
                    "Those exponents are -inf in exact arithmetic (e.g. silent neurons with a zero "
                    "surrogate gradient) or below the dtype's range.")


def _convergence(history: torch.Tensor) -> float:
    """Largest change of the running estimate over the last quarter of the run."""
    tail = history[-max(2, len(history) // 4):]
    return float((tail - tail[-1]).abs().max()) if len(tail) > 1 else math.nan
