"""Twin rows share their samples' dropout masks and batch-norm statistics, in any model.

While a Lyapunov estimate runs a model on a batch of ``B`` samples followed by ``K`` twin rows,
:func:`shared_across_twins` makes, for the duration of the run,

* every ``nn.BatchNorm*`` (spikingjelly's step-mode subclasses included) normalize all rows with
  the batch statistics of the ``B`` samples and update its running statistics from them only:
  the samples run through the module's own forward, exactly as in a plain forward on them;
* every ``nn.Dropout``, ``Dropout1d/2d/3d`` draw its mask for the samples and give each twin the
  mask of its sample; spikingjelly's ``layer.Dropout`` likewise (its mask is kept per sequence).

Rows are recognized by count: a tensor whose first dimension is ``m * (B + K)`` is read as ``m``
blocks of ``B + K`` rows (``m = T`` for a time-flattened multi-step batch); in a model with
multi-step neurons (``time_first``), a dropout's input whose first dimension is not a multiple of
``B + K`` but whose second is ``B + K`` is read as ``(T, B + K, ...)``. Dropout applied through ``torch.nn.functional`` inside a forward is
not seen and would differ between twins.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .twins import TwinRows

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@contextlib.contextmanager
def shared_across_twins(model, rows: TwinRows, time_first: bool = False) -> Iterator[None]:
    """Within the block, batch norm and dropout of ``model`` treat twins as their samples.
    ``time_first``: the model has multi-step neurons, so tensors between them are ``(T, B + K, ...)``."""
    patched = []
    modules = model.modules() if isinstance(model, nn.Module) else ()
    try:
        for module in modules:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                patched.append(_patch(module, "forward", functools.partial(_batch_norm, module, rows)))
            elif isinstance(module, _DROPOUTS):
                patched.append(_patch(module, "forward", functools.partial(_dropout, module, rows, time_first)))
            elif callable(getattr(type(module), "create_mask", None)) and hasattr(module, "p"):
                # spikingjelly layer.Dropout*: one mask per sequence, drawn by create_mask
                patched.append(_patch(module, "create_mask", functools.partial(_create_mask, module, rows)))
                patched.append(_patch(module, "forward", functools.partial(_kept_mask_forward, module, rows)))
        yield
    finally:
        for module, name, previous in reversed(patched):
            if previous is None:
                del module.__dict__[name]
            else:
                module.__dict__[name] = previous


def _patch(module: nn.Module, name: str, replacement):
    previous = module.__dict__.get(name)
    module.__dict__[name] = replacement  # an instance attribute: hooks and the class stay as they are
    return module, name, previous


def _blocks(x: torch.Tensor, rows: TwinRows, time_first: bool = False):
    """``(m * (B + K), ...) -> (m, B + K, ...)``, else with ``time_first`` a ``(T, B + K, ...)``
    as it is; None when ``x`` is not laid out so (or holds the samples only: before the twins'
    rows were appended at the first neuron, a time-flattened ``T * B`` could be a multiple of
    ``B + K``). A ``(T, B + K, ...)`` whose ``T`` is a multiple of ``B + K`` is read the first way."""
    if x.dim() == 0 or not rows.started:
        return None
    if x.shape[0] % rows.total == 0:  # first: a flattened (T (B + K), F) may have F == B + K
        return x.unflatten(0, (x.shape[0] // rows.total, rows.total))
    if time_first and x.dim() > 1 and x.shape[1] == rows.total:
        return x
    return None


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, rows: TwinRows, x: torch.Tensor) -> torch.Tensor:
    """All rows normalized with the batch statistics of the samples; running statistics updated
    from the samples as a plain forward does."""
    uses_batch = bn.training or bn.running_mean is None
    multistep = getattr(bn, "step_mode", "s") == "m"  # spikingjelly: (T, N, C, ...)
    flat = x.flatten(0, 1) if multistep else x
    blocks = _blocks(flat, rows)
    samples = flat if blocks is None else blocks[:, : rows.batch]  # before the first neuron: all
    values = samples.numel() // max(1, samples.shape[1 if blocks is None else 2]) if flat.dim() > 1 else 0
    if bn.training and values < 2:  # as torch's own batch norm refuses
        raise ValueError(
            f"x: {type(bn).__name__} in training mode needs more than 1 value per channel from the "
            f"samples, got {values} (input of shape {tuple(x.shape)} holding {rows.batch} sample(s)"
            f"{'' if blocks is None else ' and their twins'}); use a batch of at least 2 samples "
            "or model.eval()")
    if not uses_batch or blocks is None:
        return type(bn).forward(bn, x)
    if isinstance(bn, nn.SyncBatchNorm) or fwAD.unpack_dual(x).tangent is not None:
        out = _batch_norm_composite(bn, rows, blocks, multistep)  # cross-rank statistics; forward mode
    else:
        weight = bn.weight if bn.affine else None
        bias = bn.bias if bn.affine else None
        out, mean, var = _SharedBatchNorm.apply(blocks, weight, bias, rows.batch, bn.eps)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            _update_running_stats(bn, mean, var, blocks[:, : rows.batch].numel() // blocks.shape[2])
        out = out.flatten(0, 1)
    return out.unflatten(0, x.shape[:2]) if multistep else out


@torch.no_grad()
def _update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """As ``nn.BatchNorm`` does: exponential (or cumulative) average, unbiased variance."""
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), alpha=factor)


class _SharedBatchNorm(torch.autograd.Function):
    """``(m, B + K, C, ...)`` rows normalized with the mean and variance of the first ``B`` of
    each block, as one node: the statistics by two passes over the samples, the normalization by
    aten's batch norm over all rows, the gradient (through the samples' statistics) written out.
    As separate operations it cost a third of a regularized VGG step's extra time.
    Outputs: the normalized rows, then the samples' mean and biased variance (not differentiable)."""

    @staticmethod
    def forward(ctx, blocks, weight, bias, batch: int, eps: float):
        # statistics in the parameters' precision, as aten's batch norm takes them (under CPU
        # autocast the rows are bfloat16 and the parameters float32: "mixed dtype" before)
        samples = blocks[:, :batch]
        stat_dtype = weight.dtype if weight is not None else torch.promote_types(blocks.dtype, torch.float32)
        var, mean = _channel_stats(samples if samples.dtype == stat_dtype else samples.to(stat_dtype))
        invstd = torch.rsqrt(var + eps)
        y = torch.nn.functional.batch_norm(blocks.flatten(0, 1), mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(blocks, weight, mean, var, invstd)
        ctx.batch, ctx.eps = batch, eps
        ctx.mark_non_differentiable(mean, var)
        return y.view_as(blocks), mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        blocks, weight, mean, var, invstd = ctx.saved_tensors
        batch = ctx.batch
        # as if the statistics were constants: aten's batch-norm backward in evaluation mode
        # gives grad * weight * invstd, sum(grad * xhat) and sum(grad) in one fused pass
        g_x, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            grad.flatten(0, 1), blocks.flatten(0, 1), weight, mean, var, None, None, False, ctx.eps,
            [True, True, True])
        g_x = g_x.view_as(blocks)
        # the statistics come from the samples: d mean / dx = 1/n, d invstd / dx = -invstd^2 xhat / n,
        # so each sample row gets -(g_b w + xhat g_w w) invstd / n, affine in x: x * a + c
        n = blocks[:, :batch].numel() // blocks.shape[2]
        w = torch.ones_like(invstd) if weight is None else weight
        shape = (1, 1, -1) + (1,) * (blocks.dim() - 3)
        a = g_w * w * invstd.square() / n
        c = g_b * w * invstd / n - mean * a
        g_x[:, :batch].addcmul_(blocks[:, :batch], -a.view(shape)).sub_(c.view(shape))
        if weight is None:
            return g_x, None, None, None, None
        return g_x, g_w if ctx.needs_input_grad[1] else None, g_b if ctx.needs_input_grad[2] else None, None, None


def _channel_stats(x: torch.Tensor):
    """Biased variance and mean per channel of ``x`` ``(m, B, C, ...)``, by two passes (mean,
    then squared deviations), each summed over the inner dimensions first: torch.var_mean over
    dimensions around the channel took 4x as long on a CSNN's (4, 64, 32, 28, 28)."""
    inner = tuple(range(3, x.dim()))
    n = x.numel() // x.shape[2]
    shape = (1, 1, -1) + (1,) * len(inner)

    def total(v):
        return (v.sum(dim=inner) if inner else v).sum(dim=(0, 1))
    mean = total(x) / n
    return total((x - mean.view(shape)).square_()) / n, mean


def _batch_norm_composite(bn, rows: TwinRows, blocks: torch.Tensor, multistep: bool) -> torch.Tensor:
    """The same with the module's own forward on the samples (cross-rank statistics for
    ``SyncBatchNorm``) and each twin as its sample's output plus its difference times
    ``weight / std``; differentiable in both modes. Returns ``(m * (B + K), C, ...)``."""
    nominal = blocks[:, : rows.batch].flatten(0, 1)  # (m * B, C, ...)
    own = nn.modules.batchnorm._BatchNorm.forward if multistep else type(bn).forward
    y = own(bn, nominal).unflatten(0, (blocks.shape[0], rows.batch))  # (m, B, C, ...)
    scale = _InverseStd.apply(nominal, bn.eps) * (bn.weight if bn.affine else 1.0)
    shape = (1, 1, -1) + (1,) * (nominal.dim() - 2)
    twins = blocks[:, rows.batch:]
    y_twins = _partner_blocks(y, rows) + (twins - _partner_blocks(blocks, rows)) * scale.view(shape)
    return torch.cat([y, y_twins], dim=1).flatten(0, 1)


class _InverseStd(torch.autograd.Function):
    """``1 / sqrt(var + eps)`` per channel of ``x`` ``(N, C, ...)`` (biased variance over all but
    the channels), the statistic batch norm divides by. One node with its derivative
    ``-invstd^3 (x - mean) / n`` written out (both modes): as plain operations (mean, subtract, square, mean
    and their backward) it was ~10 passes over the batch per call, a third of a regularized VGG
    step's extra cost; this is two passes each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        invstd = torch.rsqrt((x - mean).square().mean(dim=dims) + eps)
        ctx.save_for_backward(x, mean, invstd)
        ctx.save_for_forward(x, mean, invstd)
        return invstd

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, _eps_tangent):  # the tangent spectrum runs forward mode
        x, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        return -invstd.pow(3) * ((x - mean) * x_tangent).mean(dim=dims)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        coef = -grad * invstd.pow(3) * (x.shape[1] / x.numel())  # d invstd / d var * d var / dx
        return (x - mean) * coef.view(shape), None


def _partner_blocks(blocks: torch.Tensor, rows: TwinRows) -> torch.Tensor:
    """``(m, B [+ K], ...) -> (m, K, ...)``: each twin's sample."""
    return blocks[:, : rows.batch] if rows.all_rows else blocks.index_select(1, rows.index.to(blocks.device))


def _dropout(module: nn.Module, rows: TwinRows, time_first: bool, x: torch.Tensor) -> torch.Tensor:
    """The samples' mask drawn as a plain call draws it (the same elements in the same order),
    each twin given its sample's."""
    plain = type(module).forward
    blocks = _blocks(x, rows, time_first)
    if not module.training or module.p == 0 or blocks is None:
        return plain(module, x)
    ones = torch.ones_like(blocks[:, : rows.batch]).flatten(0, 1)
    mask = plain(module, ones).unflatten(0, blocks.shape[:1] + (rows.batch,))  # 0 or 1/(1-p)
    return x * rows.extend(mask, dim=1).view_as(x)


def _kept_mask_forward(module: nn.Module, rows: TwinRows, x: torch.Tensor, *args, **kwargs):
    """spikingjelly's dropout, whose mask lives until ``reset()``: a mask an earlier call drew
    for the samples (a forward that does not reset the network) gets its twins' copies before
    it meets the twin rows, as a neuron's kept state does."""
    mask = getattr(module, "mask", None)
    batch_dim = 1 if getattr(module, "step_mode", "s") == "m" else 0
    if (isinstance(mask, torch.Tensor) and rows.started and mask.dim() > 0
            and mask.shape[0] == rows.batch and x.dim() > batch_dim and x.shape[batch_dim] == rows.total):
        module.mask = rows.extend(mask, dim=0)
    return type(module).forward(module, x, *args, **kwargs)


def _create_mask(module: nn.Module, rows: TwinRows, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's mask for one step's ``(B + K, ...)``: drawn for the samples, copied to twins."""
    plain = type(module).create_mask
    if x.dim() == 0 or x.shape[0] != rows.total or not rows.started:
        return plain(module, x)
    return rows.extend(plain(module, x[: rows.batch]), dim=0)
