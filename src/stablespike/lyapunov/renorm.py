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

import ctypes
import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..dynamics import TwinLayout
from .. import native


def row_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row Euclidean norm over several ``(K, ...)`` tensors together, ``(K,)``.

    Floored at the dtype's smallest normal number so that log and division stay finite.
    """
    norms = [torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors]  # no concatenated copy
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


class _Renormalize(torch.autograd.Function):
    """The PyTorch operations (any device); ``inplace`` rewrites the twin rows of ``states``."""

    # forward(ctx, ...) style: a separate setup_context costs an inspect.signature per call.
    @staticmethod
    def forward(ctx, twins: TwinLayout, groups: Tuple[Tuple[int, ...], ...], target: float,
                inplace: bool, *states):
        if twins.differences:  # the states are the differences: no partner rows, new tensors
            B, index, partners, diffs = 0, None, None, list(states)
        else:
            B, index = twins.batch, (None if twins._all_rows else twins.index)
            partners = [s[:B] if index is None else s.index_select(0, index) for s in states]
            diffs = [torch.sub(s[B:], p) for s, p in zip(states, partners)]
        outs: List[torch.Tensor] = list(states)
        norms = []
        for group in groups:
            n = row_norm([diffs[j] for j in group])
            scale = target / n
            for j in group:
                col = scale.view(_col_shape(diffs[j]))
                if partners is None:
                    outs[j] = diffs[j] * col
                elif inplace:  # write the twin rows where they are: no copy of the nominal rows
                    torch.addcmul(partners[j], diffs[j], col, out=states[j][B:])
                else:
                    outs[j] = torch.cat([states[j][:B], torch.addcmul(partners[j], diffs[j], col)], dim=0)
            norms.append(n)
        if inplace:
            ctx.mark_dirty(*states)
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
        # an output kept as a ctx attribute would be a reference cycle (output -> node -> ctx)
        # that holds the whole graph until Python's cycle collector runs: saved as such instead
        ctx.save_for_backward(total)
        ctx.saved = (B, index, groups, target, diffs, norms if len(norms) > 1 else None, partners is None)
        return (total, *outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, *g_states):
        (total,) = ctx.saved_tensors
        B, index, groups, target, diffs, norms, differences = ctx.saved
        grads = _backward(B, index, groups, target, diffs, norms or [total], total, differences,
                          g_total, g_states)
        return (None, None, None, None, *grads)


def _backward(B, index, groups, target, diffs, norms, total, differences, g_total, g_states
              ) -> List[torch.Tensor]:
    """The chain rule through the renormalization, in PyTorch operations."""
    grads: List[torch.Tensor] = [None] * len(g_states)
    for gi, group in enumerate(groups):
        n = norms[gi]
        scale = target / n
        twin_grads = {j: g_states[j][B:] for j in group if g_states[j] is not None}
        # dL/dn per row: from the returned total norm, and through scale = target / n from
        # the rescaled twins (-scale / n * sum_j <G_j, D_j>)
        coef = None
        if g_total is not None:
            coef = g_total if len(groups) == 1 else g_total * n / total
        for j, G in twin_grads.items():
            dot = torch.linalg.vecdot(G.reshape(G.shape[0], -1), diffs[j].reshape(G.shape[0], -1))
            coef = dot.mul(scale / n).neg_() if coef is None else coef.sub(dot.mul(scale / n))
        if coef is not None:  # then / n; a zero divergence (n at its floor) passes no gradient
            coef = coef.div(n).nan_to_num_(0.0, 0.0, 0.0)
        for j in group:
            grads[j] = _state_grad(g_states[j], twin_grads.get(j), diffs[j], scale, coef, B, index,
                                   differences)
    return grads


# Above this many state values per call the passes over memory dominate, and PyTorch's operations
# (on all cores) beat the one-threaded kernel. Measured on 2 cores, MLP 784-256xD, B=64: with a
# twin per row at D=8 (128 x 2048 values) 1.86x with the kernel, 1.49x without; at D=4
# (128 x 1024) 1.54x with, 1.66x without; a 1/8 sub-batch at D=8 (72 x 2048) 1.14x with, 1.25x
# without. The crossover lies between 147k and 262k values.
_NATIVE_MAX_ELEMENTS = 200_000


class _NativePlan:
    """What the C kernel needs besides the tensors, prepared once per estimate (ctypes arrays)."""

    def __init__(self, fns, twins: TwinLayout, groups, target: float, states):
        self.forward, self.backward = fns
        self.target, self.differences = target, twins.differences
        self.B = 0 if twins.differences else twins.batch  # differences: the K rows alone
        self.K, self.G, self.n = twins.twins, len(groups), len(states)
        self.index = None if twins._all_rows or twins.differences else twins.index  # kept alive
        self.index_ptr = None if self.index is None else self.index.data_ptr()
        self.shapes = [s.shape for s in states]
        sizes = [s[0].numel() for s in states]
        self.diff_size = self.K * sum(sizes)
        self.widths = _array_type(ctypes.c_int64, self.n)(*sizes)
        group_of = [0] * self.n
        for g, group in enumerate(groups):
            for j in group:
                group_of[j] = g
        self.group_of = _array_type(ctypes.c_int, self.n)(*group_of)
        self.tiny = torch.finfo(states[0].dtype).tiny


class _NativeRenormalize(torch.autograd.Function):
    """The same node in one C call per direction (CPU, float32/64, contiguous): twin rows in
    place, or differences into new tensors."""

    @staticmethod
    def forward(ctx, plan: _NativePlan, *states):
        first = states[0]
        flat = first.new_empty(plan.diff_size)
        norms = first.new_empty(plan.G, plan.K)
        total = first.new_empty(plan.K)
        outs = [torch.empty_like(s) for s in states] if plan.differences else states
        plan.forward(plan.n, _pointers(states), _pointers(outs), plan.widths, plan.group_of, plan.G,
                     plan.B, plan.K, plan.index_ptr, int(plan.differences), plan.target, plan.tiny,
                     flat.data_ptr(), norms.data_ptr(), total.data_ptr())
        if not plan.differences:
            ctx.mark_dirty(*states)
        ctx.save_for_backward(total)  # an output: as a ctx attribute, a reference cycle
        ctx.plan, ctx.buffers = plan, (flat, norms)
        return (total, *outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, *g_states):
        (total,), plan, (flat, norms) = ctx.saved_tensors, ctx.plan, ctx.buffers
        g_states = [None if g is None else g.contiguous() for g in g_states]
        grads = [flat.new_empty(shape) for shape in plan.shapes]
        plan.backward(plan.n, _pointers(g_states), _pointers(grads), plan.widths, plan.group_of,
                      plan.G, plan.B, plan.K, plan.index_ptr, int(plan.differences), plan.target,
                      flat.data_ptr(),
                      norms.data_ptr(), total.data_ptr(),
                      None if g_total is None else g_total.contiguous().data_ptr())
        return (None, *grads)


def _pointers(tensors) -> ctypes.Array:
    return _array_type(ctypes.c_void_p, len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


@functools.lru_cache(maxsize=None)
def _array_type(ctype, n: int):
    """``ctype * n``, made once: each such expression builds a new class (~10 us, and a
    reference cycle left to Python's cycle collector)."""
    return ctype * n


def _col_shape(like: torch.Tensor) -> Tuple[int, ...]:
    """``(K, 1, ..., 1)``: a per-row factor broadcast against ``like``."""
    return (like.shape[0],) + (1,) * (like.dim() - 1)


def _state_grad(g, G, d, scale, coef, B: int, index, differences: bool = False) -> torch.Tensor:
    """Gradient w.r.t. one state tensor ``(B + K, ...)``. Twin rows: dL/dD = scale * G + coef * D
    (the twin enters only through D). Partner rows: G - dL/dD (the partner enters the new twin
    directly and through D with a minus sign), added to the nominal rows' own gradient.
    ``differences``: the tensor is D itself (B = 0): the twin rows' part alone."""
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
    if differences:
        return grad
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


class Renormalizer:
    """Rescales each group's twin divergence to norm ``target`` per sample; one per estimate,
    called at every renormalization step (what stays the same between steps is prepared once).

    ``groups``: positions into the state list that share one norm (one group: global
    renormalization). ``inplace``: overwrite the twin rows of the states instead of building new
    tensors; only for steppers that never save their state tensors for backward (autograd raises
    if one did). In place on the CPU (float32/64, contiguous) it runs the C kernel of
    :mod:`.native` when that could be built.
    """

    def __init__(self, twins: TwinLayout, groups: Sequence[Sequence[int]], target: float,
                 inplace: bool = False):
        self.twins, self.target, self.inplace = twins, float(target), inplace
        self.groups = tuple(tuple(g) for g in groups)
        self._plan, self._plan_key = None, None

    def __call__(self, states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``states``: the perturbed tensors ``(B + K, ...)``. Returns the total divergence norm
        before rescaling ``(K,)`` and the new state tensors."""
        if self.twins.differences:  # new tensors: nothing is rewritten in place
            plan = self._native_plan(states)
            if plan is None:
                total, *outs = _Renormalize.apply(self.twins, self.groups, self.target, False, *states)
            else:
                total, *outs = _NativeRenormalize.apply(plan, *states)
            return total, outs
        # autograd cannot rewrite views (e.g. outputs wrapped by full backward hooks) or leaves in place
        inplace = self.inplace and all(s._base is None and not (s.is_leaf and s.requires_grad)
                                       for s in states)
        plan = self._native_plan(states) if inplace else None
        if plan is not None:
            total, *outs = _NativeRenormalize.apply(plan, *states)
        else:
            total, *outs = _Renormalize.apply(self.twins, self.groups, self.target, inplace, *states)
        return total, outs

    def _native_plan(self, states) -> Optional[_NativePlan]:
        dtype = states[0].dtype
        if any(s.device.type != "cpu" or s.dtype != dtype or not s.is_contiguous() for s in states):
            return None
        if sum(s.numel() for s in states) > _NATIVE_MAX_ELEMENTS:
            return None
        key = (native.enabled(), dtype, tuple(s.shape for s in states))
        if key != self._plan_key:
            fns = native.kernel(dtype)
            index = self.twins.index
            usable = fns is not None and (self.twins._all_rows or self.twins.differences or (
                index.device.type == "cpu" and index.dtype == torch.int64 and index.is_contiguous()))
            self._plan = _NativePlan(fns, self.twins, self.groups, self.target, states) if usable else None
            self._plan_key = key
        return self._plan
