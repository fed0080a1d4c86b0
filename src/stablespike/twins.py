"""The twin engine's core, shared by both drivers (steppers and modules with spiking neurons).

A finite-difference (Benettin) estimate carries, beside the ``B`` nominal samples of a batch,
``K`` twin rows: copies of some samples whose continuous state (membranes, synaptic currents)
is displaced by a random direction of norm ``eps`` per sample. After every ``renorm_every`` steps
the per-sample distance between each twin and its nominal row is measured over exactly the
perturbed state, its log-growth accumulated, and the displacement scaled back to ``eps``.

This module knows nothing about models: it works on the state tensors ``(B + K, ...)`` a driver
hands it, grouped by layer. The drivers (:mod:`stablespike.dynamics` for steppers,
:mod:`stablespike.neuron_twins` for modules) decide when a step ends and where state lives.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ._checks import user_stacklevel
from .degenerate import FlooredLog, warn_degenerate

RENORM_MODES = ("global", "per_layer")
# twins further from their sample than this share of the samples' spread left the linear regime
SATURATION = 0.1


class TwinRows:
    """``batch`` nominal rows followed by one twin row per entry of ``index`` ``(K,)``, the
    nominal row each twin copies. With ``index = arange(B)`` every sample has a twin."""

    def __init__(self, batch: int, index: torch.Tensor):
        self.batch, self.index = int(batch), index
        self.twins = int(index.numel())
        self.total = self.batch + self.twins
        self.all_rows = self.twins == self.batch and bool(torch.equal(index.cpu(), torch.arange(self.batch)))
        # whether tensors may hold the twin rows yet (False while a model runs on its samples
        # before its first neuron, where the module driver appends them)
        self.started = True

    def extend(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``x`` with the twins' copies of their samples appended along ``dim`` (B -> B + K)."""
        return _AppendCopies.apply(x, None if self.all_rows else self.index.to(x.device), dim)

    def partner(self, s: torch.Tensor) -> torch.Tensor:
        """``(B + K, ...) -> (K, ...)``: the nominal row of each twin."""
        return s[: self.batch] if self.all_rows else s.index_select(0, self.index.to(s.device))

    def difference(self, s: torch.Tensor) -> torch.Tensor:
        """``(B + K, ...) -> (K, ...)``: twin minus its nominal row."""
        return s[self.batch:] - self.partner(s)

    def with_difference(self, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``s`` whose twin rows are set to their nominal row plus ``d`` ``(K, ...)``."""
        return torch.cat([s[: self.batch], self.partner(s) + d.to(s.dtype)])


class _AppendCopies(torch.autograd.Function):
    """``x`` with copies of its entries ``index`` along ``dim`` (None: all of them) appended.
    The gradient adds each copy's into its entry in one pass; autograd's own for ``cat`` of an
    ``index_select`` made a zero tensor of ``x``'s size, added into it and summed it with the
    rest (three passes over a multi-step CSNN's largest activation, 7 % of its training step)."""

    @staticmethod
    def forward(ctx, x, index, dim: int):
        copies = x if index is None else x.index_select(dim, index)
        ctx.dim, ctx.batch = dim, x.shape[dim]
        ctx.save_for_backward(index)
        ctx.save_for_forward(index)
        return torch.cat([x, copies], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        rows = grad.narrow(ctx.dim, 0, ctx.batch)
        copies = grad.narrow(ctx.dim, ctx.batch, grad.shape[ctx.dim] - ctx.batch)
        if index is None:
            return rows + copies, None, None
        return rows.clone().index_add_(ctx.dim, index, copies), None, None

    @staticmethod
    def jvp(ctx, x_tangent, _index_tangent, _dim_tangent):
        index, = ctx.saved_tensors
        copies = x_tangent if index is None else x_tangent.index_select(ctx.dim, index)
        return torch.cat([x_tangent, copies], dim=ctx.dim)


def choose_rows(batch: int, fraction: float, device, generator: Optional[torch.Generator]) -> TwinRows:
    """Twins for all rows, or for a random sorted subset of ``ceil(fraction * batch)`` rows."""
    k = max(1, math.ceil(fraction * batch))
    if k >= batch:
        return TwinRows(batch, torch.arange(batch, device=device))
    perm = torch.randperm(batch, generator=generator, device="cpu")[:k]
    return TwinRows(batch, perm.sort().values.to(device))


@contextlib.contextmanager
def drawing_aside(generator: Optional[torch.Generator]) -> Iterator[torch.Generator]:
    """``generator``, or where it is None a CPU generator seeded from torch's global one, which
    is then left as it was until the block ends and advanced by one draw after it. An estimate
    draws (twin rows, directions) while the model runs; from the global generator those draws
    would shift the random numbers the model draws after them (dropout masks), so its outputs
    would not be a plain call's. The draw after the block makes the next estimate differ."""
    if generator is not None:
        yield generator
        return
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2 ** 62, ()))
    torch.set_rng_state(state)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.randint(0, 2, ())


def squared_norm(diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample sum of squares over a list of ``(K, ...)`` tensors, ``(K,)``."""
    return sum(d.pow(2).flatten(1).sum(1) for d in diffs)


def random_direction(shapes: Sequence[torch.Size], norm: float, like: torch.Tensor,
                     generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    """Random tensors of the given ``(K, ...)`` shapes whose joint norm is ``norm`` per sample,
    drawn in ``like``'s dtype when it is float64 and in float32 otherwise (float64 draws took 5x
    as long: 5 ms per layer of a small CSNN, 4 % of its training step)."""
    draw = torch.float64 if like.dtype == torch.float64 else torch.float32
    noise = [torch.randn(tuple(s), generator=generator, dtype=draw).to(like.device, like.dtype)
             for s in shapes]
    return _scaled(noise, squared_norm(noise), norm)


def _scaled(diffs, sq, target):
    scale = target / sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()  # a zero difference stays zero
    return [d * scale.view(-1, *[1] * (d.dim() - 1)) for d in diffs]


class TwinEstimate:
    """Measures and renormalizes twin differences, and keeps the per-sample log-growth.

    Steps are counted from the first step after the perturbation. A driver calls
    :meth:`perturbation` once, then for each group (layer) at the end of every interval
    :meth:`renormalize`; the interval ends after steps ``renorm_every - 1, 2 renorm_every - 1,
    ...`` and at the last step (:meth:`is_boundary`). ``groups`` is the number of layers.
    """

    def __init__(self, rows: TwinRows, eps: float, renorm: str, groups: int, *,
                 renorm_every: int = 1, discard: int = 0, count_flips: bool = True):
        self.rows, self.eps, self.renorm, self.groups = rows, float(eps), renorm, int(groups)
        self.every, self.discard, self.count_flips = int(renorm_every), int(discard), count_flips
        # share of eps per layer: the joint norm after renormalization is eps in both modes
        self.group_target = self.eps / math.sqrt(self.groups) if renorm == "per_layer" else self.eps
        self._sq: Dict[int, Dict[int, torch.Tensor]] = {}  # interval end step -> group -> (K,)
        self._flips: Dict[int, torch.Tensor] = {}  # step -> (K,) bool: any spike differed
        self._saturated: Optional[torch.Tensor] = None  # largest share of twins far from their sample

    def is_boundary(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def perturbation(self, shapes: Sequence[torch.Size], like: torch.Tensor, generator) -> List[torch.Tensor]:
        """Random differences ``(K, ...)`` for one group (``per_layer``) or all (``global``)."""
        return random_direction(shapes, self.group_target, like, generator)

    def renormalize(self, step: int, states: Sequence[torch.Tensor], groups: Sequence[int]) -> List[torch.Tensor]:
        """``states`` ``(B + K, ...)`` with their twins put back at distance ``eps`` (jointly in
        ``global`` mode, which must get every state at once; in ``per_layer`` mode each group,
        given by ``groups`` (the layer of each state), to its share); the distances before are
        recorded as the growth of the interval ending at ``step``."""
        group_of = list(groups) if self.renorm == "per_layer" else [0] * len(states)
        ids = sorted(set(group_of))
        local = [ids.index(g) for g in group_of]
        index = None if self.rows.all_rows else self.rows.index.to(states[0].device)
        *new, sq = renormalized(states, index, self.rows.batch, local, self.group_target)
        self._sq.setdefault(step, {}).update({g: sq[i] for i, g in enumerate(ids)})
        if self.every > 1:
            self._check_saturation(states, sq.detach().sum(0))
        return new

    def _check_saturation(self, states, sq: torch.Tensor) -> None:
        """Twins that drifted from their sample by more than ``SATURATION`` of the typical distance
        between samples (the attractor's size) within an interval left the linear regime: their
        growth is capped by the attractor, not set by the dynamics."""
        samples = torch.cat([s[:self.rows.batch].detach().flatten(1) for s in states], dim=1)
        spread_sq = (samples - samples.mean(0)).pow(2).sum(1).mean()  # 0 when all samples agree
        far = ((sq > SATURATION ** 2 * spread_sq) & (spread_sq > 0)).float().mean()
        self._saturated = far if self._saturated is None else torch.maximum(self._saturated, far)

    def record_flips(self, step: int, differ: torch.Tensor) -> None:
        """``differ`` ``(K,)`` bool: some spike of a twin differed from its nominal row's."""
        if self.count_flips:
            prev = self._flips.get(step)
            self._flips[step] = differ if prev is None else prev | differ

    def per_sample(self) -> torch.Tensor:
        """Mean log-growth per step of each twin over the counted intervals, ``(K,)``."""
        ends = sorted(self._sq)
        incomplete = [e for e in ends if len(self._sq[e]) != self.groups]
        if incomplete:
            raise RuntimeError(f"steps {incomplete[:5]}: not every layer reported its state "
                               f"({self.groups} expected)")
        starts = [0] + [e + 1 for e in ends[:-1]]
        counted = [(s, e) for s, e in zip(starts, ends) if s >= self.discard]
        if not counted:
            raise ValueError(f"discard: {self.discard} leaves no whole renormalization interval "
                             f"(renorm_every={self.every}) in the {ends[-1] + 1 if ends else 0} "
                             "measured steps")
        sq = torch.stack([sum(self._sq[e].values()) for _, e in counted])  # (intervals, K)
        log = FlooredLog()
        logs = 0.5 * log(sq) - math.log(self.eps)
        self.counted_steps = sum(e - s + 1 for s, e in counted)
        per_sample = logs.sum(0) / self.counted_steps
        warn_degenerate(
            "finite_difference_lyapunov", per_sample, log,
            f"Lower renorm_every (got {self.every}) or eps (got {self.eps:g}), or use float64.",
            "The twins coincided exactly (zero divergence): eps is too small for this dtype, or "
            "the chosen layers do not depend on their state.")
        if self._saturated is not None and float(self._saturated) > 0:
            warnings.warn(
                f"finite_difference_lyapunov: within a renormalization interval, up to "
                f"{float(self._saturated):.0%} of the twins drifted from their sample by more than "
                f"{SATURATION:.0%} of the typical distance between samples: their growth saturated and the "
                f"exponent is underestimated. Lower renorm_every (got {self.every}) or eps "
                f"(got {self.eps:g}).", RuntimeWarning, stacklevel=user_stacklevel())
        return per_sample

    def flip_fraction(self) -> float:
        """Flipped (step, twin) pairs over all measured pairs; NaN when no spikes were seen."""
        if not self._flips:
            return float("nan")
        flips = torch.stack(list(self._flips.values()))
        return float(flips.float().mean())


def renormalized(states: Sequence[torch.Tensor], index: Optional[torch.Tensor], batch: int, groups,
                 target: float) -> List[torch.Tensor]:
    """``states`` ``(B + K, ...)`` with each twin row put back at distance ``target`` from its
    sample row, per group of states (``groups[i]``: the group of state ``i``, numbered from 0):
    ``twin <- sample + d * target / |d|`` with ``d = twin - sample`` and ``|d|`` over the group.
    ``index`` ``(K,)``: the sample of each twin (None: twin ``i`` copies sample ``i``). Returns
    the new states, then ``sq`` ``(G, K)``, the squared distances before.

    The states are laid side by side as one ``(B + K, N)`` tensor, renormalized by one autograd
    node, and handed back as views of its result: a fixed handful of operations per step
    whatever the number of layers (on a CPU each operation costs ~8 us of dispatch however small).
    """
    widths = tuple(s.numel() // s.shape[0] for s in states)  # not s[0].numel(): a view each, 5 us
    rows = states[0].flatten(1) if len(states) == 1 else torch.cat([s.flatten(1) for s in states], dim=1)
    new, sq = _Renormalize.apply(rows, index, int(batch), widths, tuple(groups), float(target))
    parts = (new,) if len(states) == 1 else new.split(widths, dim=1)
    return [part if part.shape == s.shape else part.view(s.shape) for part, s in zip(parts, states)] + [sq]


class _Renormalize(torch.autograd.Function):
    """The renormalization of :func:`renormalized` on the side-by-side rows ``(B + K, N)``, with
    its gradient written out (~15 operations as plain autograd; ``tests/test_twins.py`` checks
    values and gradients against them and by gradcheck). Outputs: the new rows, ``sq`` ``(G, K)``."""

    @staticmethod
    def forward(ctx, rows, index, batch: int, widths, groups, target: float):
        partners = rows[:batch] if index is None else rows.index_select(0, index)
        d = rows[batch:] - partners  # (K, N)
        sq = _group_sq(d, widths, groups)  # (G, K)
        scale = target * sq.clamp_min(torch.finfo(sq.dtype).tiny).rsqrt()  # 0 distance stays 0
        new = torch.empty_like(rows)
        new[:batch] = rows[:batch]
        torch.addcmul(partners, d, _per_column(scale, widths, groups), out=new[batch:])
        ctx.batch, ctx.widths, ctx.groups = batch, widths, groups
        ctx.save_for_backward(index, sq, scale, d)
        return new, sq

    @staticmethod
    def backward(ctx, grad_new, grad_sq):
        index, sq, scale, d = ctx.saved_tensors
        batch, widths, groups = ctx.batch, ctx.widths, ctx.groups
        g_twins = grad_new[batch:]
        # through the scale: dL/dsq = sum(g . d) * d(scale)/dsq, d(scale)/dsq = -scale / (2 sq)
        tiny = torch.finfo(sq.dtype).tiny
        g_sq = _group_sq(d, widths, groups, other=g_twins) * torch.where(sq > tiny, -0.5 * scale / sq.clamp_min(tiny), 0.0)
        if grad_sq is not None:
            g_sq = g_sq + grad_sq
        grad = torch.empty_like(grad_new)
        g_d = torch.addcmul(g_twins * _per_column(scale, widths, groups), d,
                            _per_column(2.0 * g_sq, widths, groups), out=grad[batch:])
        if index is None:
            torch.add(grad_new[:batch], g_twins - g_d, out=grad[:batch])
        else:
            grad[:batch] = grad_new[:batch]
            grad[:batch].index_add_(0, index, g_twins - g_d)  # index_put_ with accumulate: 15x slower
        return grad, None, None, None, None, None


def _group_sq(d: torch.Tensor, widths, groups, other: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(G, K)``: per group of column blocks, the row-wise dot of ``d`` with ``other`` (itself),
    in their own precision: autocast would run ``vecdot`` in bfloat16 (an LIF net's ln 0.9 read
    -0.125 under CPU autocast)."""
    other = d if other is None else other
    with torch.autocast(d.device.type, enabled=False):
        if max(groups) == 0:
            return torch.linalg.vecdot(d, other).unsqueeze(0)
        dots = torch.stack([torch.linalg.vecdot(a, b) for a, b in zip(d.split(widths, 1), other.split(widths, 1))])
    return _group_sum(dots, groups)


def _per_column(v: torch.Tensor, widths, groups) -> torch.Tensor:
    """``(G, K)`` -> a factor per row and column of the side-by-side ``(K, N)`` rows."""
    if max(groups) == 0:
        return v[0].unsqueeze(1)
    return torch.cat([v[g].unsqueeze(1).expand(-1, w) for g, w in zip(groups, widths)], dim=1)


def _group_sum(rows: torch.Tensor, groups) -> torch.Tensor:
    """``(n, K) -> (G, K)``: the rows of each group (``groups[i]`` in ``0..G-1``) added up."""
    count = max(groups) + 1
    if count == 1:
        return rows.sum(0, keepdim=True)
    index = torch.tensor(groups, device=rows.device)
    return rows.new_zeros(count, rows.shape[1]).index_put((index,), rows, accumulate=True)
