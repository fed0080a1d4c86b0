"""Benettin renormalization of twin rows as one autograd node, with a hand-written backward.

Per time step and per perturbed state tensor ``S`` (rows: ``B`` nominal, then ``K`` twins)::

    D = twin(S) - partner(S)                         (K, ...)  divergence
    n = ||D over the tensors of a group||            (K,)      per sample
    S' = cat(nominal(S), partner(S) + D * target / n)          rescaled back to the target norm

Written with plain autograd this is ~6 graph nodes per tensor per step; on a CPU the per-node
overhead, not the arithmetic, then dominates a sub-batch estimate. One node computes the same
values; its backward is the chain rule written out (checked by ``torch.autograd.gradcheck``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..dynamics import TwinLayout


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(K,) -> (K, 1, ..., 1)`` to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def row_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row Euclidean norm over several ``(K, ...)`` tensors together, ``(K,)``.

    Floored at the dtype's smallest normal number so that log and division stay finite.
    """
    flat = tensors[0].flatten(1) if len(tensors) == 1 else torch.cat([t.flatten(1) for t in tensors], dim=1)
    return torch.linalg.vector_norm(flat, dim=1).clamp_min(torch.finfo(flat.dtype).tiny)


class _Renormalize(torch.autograd.Function):
    # forward(ctx, ...) style: a separate setup_context costs an inspect.signature per call.
    @staticmethod
    def forward(ctx, twins: TwinLayout, groups: Tuple[Tuple[int, ...], ...], target: float,
                inplace: bool, *states):
        partners = [twins.partner(s) for s in states]
        diffs = [twins.twin(s) - p for s, p in zip(states, partners)]
        outs: List[torch.Tensor] = [None] * len(states)
        norms = []
        for group in groups:
            n = row_norm([diffs[j] for j in group])
            scale = target / n
            for j in group:
                if inplace:  # write the twin rows where they are: no copy of the nominal rows
                    torch.addcmul(partners[j], diffs[j], _col(scale, diffs[j]), out=twins.twin(states[j]))
                    outs[j] = states[j]
                else:
                    twin = torch.addcmul(partners[j], diffs[j], _col(scale, diffs[j]))
                    outs[j] = torch.cat([twins.nominal(states[j]), twin], dim=0)
            norms.append(n)
        if inplace:
            ctx.mark_dirty(*states)
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
        ctx.twins, ctx.groups, ctx.target = twins, groups, target
        ctx.diffs, ctx.norms, ctx.total = diffs, norms, total
        return (total, *outs)

    @staticmethod
    def backward(ctx, g_total, *g_states):
        twins, B = ctx.twins, ctx.twins.batch
        grads: List[torch.Tensor] = [None] * len(g_states)
        for gi, group in enumerate(ctx.groups):
            n, diffs = ctx.norms[gi], ctx.diffs
            scale = ctx.target / n
            # dL/dn from the returned total norm
            g_n = torch.zeros_like(n) if g_total is None else (
                g_total if len(ctx.groups) == 1 else g_total * n / ctx.total)
            g_twins = {j: _twin_grad(g_states[j], diffs[j], B) for j in group}
            # dL/dscale = sum_j <G_twin_j, D_j> per row; scale = target / n adds -scale / n * that
            g_scale = sum(torch.linalg.vecdot(g_twins[j].flatten(1), diffs[j].flatten(1)) for j in group)
            coef = (g_n - g_scale * scale / n) / n
            coef = torch.where(n > torch.finfo(n.dtype).tiny, coef, torch.zeros_like(coef))
            for j in group:
                d = diffs[j]
                g_d = torch.addcmul(g_twins[j] * _col(scale, d), d, _col(coef, d))  # dL/dD
                g_nominal = _nominal_grad(g_states[j], d, B)
                grad = torch.cat([g_nominal, g_d], dim=0)  # twin rows: dD/dtwin = I
                # partner rows: d(partner + scale D)/dpartner = I - scale I, plus -dL/dD via D
                grad.index_add_(0, twins.index, g_twins[j] - g_d)
                grads[j] = grad
        return (None, None, None, None, *grads)


def _twin_grad(g: torch.Tensor, like: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g[batch:]


def _nominal_grad(g: torch.Tensor, like: torch.Tensor, batch: int) -> torch.Tensor:
    if g is None:
        return like.new_zeros((batch,) + tuple(like.shape[1:]))
    return g[:batch]


def renormalize(twins: TwinLayout, groups: Sequence[Sequence[int]], target: float,
                states: Sequence[torch.Tensor], inplace: bool = False
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Rescale each group's twin divergence to norm ``target`` per sample.

    ``states``: the perturbed state tensors ``(B + K, ...)``; ``groups``: positions into
    ``states`` that share one norm (one group: global renormalization).
    ``inplace``: overwrite the twin rows of ``states`` instead of building new tensors. Only for
    steppers that never save their state tensors for backward (autograd raises if one did).
    Returns the total divergence norm before rescaling ``(K,)`` and the new state tensors.
    """
    # autograd cannot rewrite views (e.g. outputs wrapped by full backward hooks) or leaves in place
    inplace = inplace and all(s._base is None and not (s.is_leaf and s.requires_grad) for s in states)
    total, *outs = _Renormalize.apply(twins, tuple(tuple(g) for g in groups), float(target),
                                      inplace, *states)
    return total, outs
