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


def row_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row Euclidean norm over several ``(K, ...)`` tensors together, ``(K,)``.

    Floored at the dtype's smallest normal number so that log and division stay finite.
    """
    flat = tensors[0].flatten(1) if len(tensors) == 1 else torch.cat([t.flatten(1) for t in tensors], dim=1)
    return torch.linalg.vector_norm(flat, dim=1).clamp_min(torch.finfo(flat.dtype).tiny)


class _Renormalize(torch.autograd.Function):
    # forward(ctx, ...) style: a separate setup_context costs an inspect.signature per call.
    # Written for few Python operations per call: on a CPU, a sub-batch estimate's step is bound by
    # the per-operation overhead of this node, not by its arithmetic on K rows.
    @staticmethod
    def forward(ctx, twins: TwinLayout, groups: Tuple[Tuple[int, ...], ...], target: float,
                inplace: bool, *states):
        B, index = twins.batch, (None if twins._all_rows else twins.index)
        partners = [s[:B] if index is None else s.index_select(0, index) for s in states]
        diffs = [torch.sub(s[B:], p) for s, p in zip(states, partners)]
        outs: List[torch.Tensor] = list(states)
        norms, scales = [], []
        for group in groups:
            n = row_norm([diffs[j] for j in group])
            scale = target / n
            for j in group:
                col = scale.view(_col_shape(diffs[j]))
                if inplace:  # write the twin rows where they are: no copy of the nominal rows
                    torch.addcmul(partners[j], diffs[j], col, out=states[j][B:])
                else:
                    outs[j] = torch.cat([states[j][:B], torch.addcmul(partners[j], diffs[j], col)], dim=0)
            norms.append(n)
            scales.append(scale)
        if inplace:
            ctx.mark_dirty(*states)
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
        ctx.B, ctx.index, ctx.groups = B, index, groups
        ctx.diffs, ctx.norms, ctx.scales, ctx.total = diffs, norms, scales, total
        return (total, *outs)

    @staticmethod
    def backward(ctx, g_total, *g_states):
        B, index, diffs = ctx.B, ctx.index, ctx.diffs
        grads: List[torch.Tensor] = [None] * len(g_states)
        for gi, group in enumerate(ctx.groups):
            n, scale = ctx.norms[gi], ctx.scales[gi]
            twin_grads = {j: g_states[j][B:] for j in group if g_states[j] is not None}
            # dL/dn per row: from the returned total norm, and through scale = target / n from
            # the rescaled twins (-scale / n * sum_j <G_j, D_j>)
            coef = None
            if g_total is not None:
                coef = g_total if len(ctx.groups) == 1 else g_total * n / ctx.total
            for j, G in twin_grads.items():
                dot = torch.linalg.vecdot(G.reshape(G.shape[0], -1), diffs[j].view(G.shape[0], -1))
                coef = dot.mul(scale / n).neg_() if coef is None else coef.sub(dot.mul(scale / n))
            if coef is not None:  # then / n; a zero divergence (n at its floor) passes no gradient
                coef = coef.div(n).nan_to_num_(0.0, 0.0, 0.0)
            for j in group:
                grads[j] = _state_grad(g_states[j], twin_grads.get(j), diffs[j], scale, coef, B, index)
        return (None, None, None, None, *grads)


def _col_shape(like: torch.Tensor) -> Tuple[int, ...]:
    """``(K, 1, ..., 1)``: a per-row factor broadcast against ``like``."""
    return (like.shape[0],) + (1,) * (like.dim() - 1)


def _state_grad(g, G, d, scale, coef, B: int, index) -> torch.Tensor:
    """Gradient w.r.t. one state tensor ``(B + K, ...)``. Twin rows: dL/dD = scale * G + coef * D
    (the twin enters only through D). Partner rows: G - dL/dD (the partner enters the new twin
    directly and through D with a minus sign), added to the nominal rows' own gradient."""
    K, col = d.shape[0], _col_shape(d)
    grad = d.new_empty((B + K,) + tuple(d.shape[1:]))
    twin = grad[B:]
    if G is not None:
        torch.mul(G, scale.view(col), out=twin)
        if coef is not None:
            twin.addcmul_(d, coef.view(col))
    elif coef is not None:
        torch.mul(d, coef.view(col), out=twin)
    else:
        twin.zero_()
    if g is None:
        grad[:B].zero_()
    else:
        grad[:B].copy_(g[:B])
    partner = twin.neg() if G is None else G - twin
    if index is None:
        grad[:B].add_(partner)
    else:
        grad.index_add_(0, index, partner)
    return grad


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
