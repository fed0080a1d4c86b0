"""Twin trajectories carried as differences from their nominal rows (the VGG's fast path).

The finite-difference estimator follows a perturbed twin of some batch rows. A stepper may carry
the twin as its difference ``delta = twin - partner`` (``K`` rows) next to the nominal state
(``B`` rows), instead of as ``K`` extra state rows: the nominal rows then run the ordinary step,
untouched, and the twins cost only what differs. For spiking layers fed by spikes that is little:
a twin's input spikes equal its partner's except where a spike flipped, so the difference of a
linear or convolution layer's output is ``A(delta_in)``, zero for rows without flips; the
difference of a batch norm with shared statistics is ``A(delta_in) * weight / std``; and an LIF
neuron's membrane difference obeys

    delta' = beta * delta + delta_current - threshold * (reset(twin) - reset(partner)).

These are the same functions of the parameters as the twin rows (so the same values and the
same gradients, up to float rounding; tests compare the two modes), written so that products
with the weights are taken only where they are not zero, except the input gradient, which the
surrogate needs on every twin row.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import native
from .dynamics import TwinLayout
from .surrogate import FastSigmoid, add_to_input_grad, spike_node


def leaky_supports_differences(lif: nn.Module) -> bool:
    """True for an snnTorch ``Leaky`` whose step :func:`leaky_difference` reproduces: subtractive
    delayed reset (the defaults), no state quantization or inhibition, fixed decay and threshold,
    and a surrogate that states its derivative (``spike_grad.derivative``, as
    :class:`stablespike.surrogate.FastSigmoid`)."""
    return (isinstance(lif, snn.Leaky) and lif.reset_mechanism_val == 0 and bool(lif.reset_delay)
            and not lif.state_quant and not lif.inhibition
            and callable(getattr(lif.spike_grad, "derivative", None))
            and not any(getattr(lif, name).requires_grad
                        for name in ("beta", "threshold", "graded_spikes_factor")))


def leaky_difference(lif: nn.Module, mem_prev: torch.Tensor, mem: torch.Tensor,
                     delta: torch.Tensor, delta_current, twins: TwinLayout,
                     spikes: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the twins of an snnTorch ``Leaky`` layer, as differences.

    ``mem_prev``, ``mem``: the nominal membrane before and after the step ``(B, ...)``;
    ``delta``: twin minus partner membrane before the step ``(K, ...)``; ``delta_current``: twin
    minus partner input current: a tensor, a :class:`LinearDifference` (computed inside this
    node: no zero tensor where no spike flipped upstream, one node less) or None (the same
    input); ``spikes``: the nominal spikes of the step, ``lif``'s output (optional, see below).
    Returns the membrane difference after the step and the spike difference, ``(K, ...)`` each,
    and the twin rows whose spikes differ from their partner's, ``(k,)``: what
    :class:`LinearDifference` takes as ``rows`` downstream, found while the spikes are computed
    (reading them back from memory cost ~150 us per VGG block step). One autograd node: on a CPU
    the per-operation overhead of ~15 small nodes cost more than their arithmetic.

    The partners' membranes get a gradient on ``K`` of ``B`` rows. Given ``spikes`` made by a
    :class:`~stablespike.surrogate.FastSigmoid`, it is added in place to the rows of the
    gradient that the surrogate computes for the membrane anyway; otherwise it goes to ``mem``
    as a zero-filled ``(B, ...)`` tensor, one more full-size pass for autograd to accumulate.
    """
    node = None
    if spikes is not None and torch.is_grad_enabled() and spikes.requires_grad:
        node = spike_node(spikes, mem)
    constants = twins.memo(("leaky", id(lif), delta.dtype, delta.device),
                           lambda: _LeakyConstants(lif, delta))
    lazy = delta_current if isinstance(delta_current, LinearDifference) else None
    tensors = (None, None, ()) if lazy is None else (lazy.delta, lazy.scale, lazy.weights)
    return _LeakyDifference.apply(constants, twins, node, lazy, mem_prev, mem, delta,
                                  None if lazy is not None else delta_current,
                                  spikes if node is not None else None, tensors[0], tensors[1],
                                  *tensors[2])


class _LeakyConstants:
    """What a step of ``lif``'s twins needs besides tensors, taken once per loop (per layout):
    decay, threshold and spike size as tensors and, for the C kernel, as numbers."""

    def __init__(self, lif: nn.Module, like: torch.Tensor):
        self.lif = lif
        self.beta, self.thr, self.factor = lif.beta.clamp(0, 1), lif.threshold, lif.graded_spikes_factor
        self.scale_spikes = bool((self.factor != 1).any())
        self.native = _native_leaky(lif, like)
        if self.native is not None:
            self.numbers = (float(self.beta), float(self.thr), float(self.factor))
            self.slope = lif.spike_grad.slope


class _LeakyDifference(torch.autograd.Function):
    """Forward (snnTorch ``Leaky``, subtract reset; ``p`` the partner rows)::

        reset = H(p(mem_prev) + delta - thr) - H(p(mem_prev) - thr)      (detached, as snnTorch)
        new   = beta * delta + delta_current - thr * reset
        dspk  = factor * (H(p(mem) + new - thr) - H(p(mem) - thr))

    (the second spike is the partner's own, recomputed from its membrane: then the partners
    receive one gradient, not two). Backward with ``s_u = factor * surrogate'(u)``:
    ``d new = g_new + g_dspk * s_twin``, ``d delta = beta * d new``, ``d delta_current = d new``,
    ``d p(mem) = g_dspk * (s_twin - s_partner)``.
    """

    @staticmethod
    def forward(ctx, constants, twins, node, lazy, mem_prev, mem, delta, delta_current, _spikes,
                upstream, scale, *weights):
        # ``_spikes`` (when ``node`` is its surrogate node) is an input only so that autograd
        # runs this backward before ``node``'s, which then adds the partner gradient.
        # ``lazy``: a LinearDifference of ``upstream``, ``scale`` and ``weights`` (its tensors,
        # inputs here so that they get their gradients), computed here; None where zero
        ctx.constants, ctx.twins, ctx.node, ctx.lazy = constants, twins, node, lazy
        if lazy is not None:
            delta_current = lazy.rows_forward()
        ctx.mem_shape, ctx.has_current = mem.shape, delta_current is not None or lazy is not None
        ctx.use_native = constants.native is not None and (
            delta_current is None or delta_current.dtype == delta.dtype)
        if ctx.use_native:
            new, dspk, flipped = _native_leaky_forward(ctx, mem_prev, mem, delta, delta_current)
            ctx.mark_non_differentiable(flipped)
            return new, dspk, flipped
        beta, thr = constants.beta, constants.thr
        partner_prev = twins.partner(mem_prev)
        # comparisons written into float tensors: several times faster on a CPU than bool -> float
        reset = torch.gt(partner_prev + delta, thr, out=torch.empty_like(delta))
        reset -= torch.gt(partner_prev, thr, out=torch.empty_like(delta))
        new = delta * beta
        new -= reset.mul_(thr)
        if delta_current is not None:
            new += delta_current
        u_partner = twins.partner(mem) - thr
        u_twin = u_partner + new
        dspk = torch.gt(u_twin, 0, out=torch.empty_like(new))
        dspk -= torch.gt(u_partner, 0, out=torch.empty_like(new))
        if constants.scale_spikes:
            dspk *= constants.factor
        ctx.save_for_backward(u_twin, u_partner)
        flipped = nonzero_rows(dspk)
        ctx.mark_non_differentiable(flipped)
        return new, dspk, flipped

    @staticmethod
    @once_differentiable
    def backward(ctx, g_new, g_dspk, _g_flipped):
        if ctx.use_native:
            g_delta, g_current, g_partner = _native_leaky_backward(ctx, g_new, g_dspk)
        else:
            g_delta, g_current, g_partner = _leaky_backward(ctx, g_new, g_dspk)
        g_mem = None
        if g_partner is not None and ctx.node is not None:
            if _will_run(ctx.node):  # else no input asked for needs the partners' gradient
                add_to_input_grad(ctx.node, ctx.twins.index, g_partner)
        elif g_partner is not None:
            g_mem = ctx.twins.scatter_to_partners(g_partner, ctx.mem_shape)
        if ctx.lazy is None:
            return (None,) * 5 + (g_mem, g_delta, g_current) + (None,) * 3
        needs = ctx.needs_input_grad
        g_upstream, g_scale, g_weights = ctx.lazy.backward(g_current, needs[9], needs[10], needs[11:])
        return (None,) * 5 + (g_mem, g_delta, None, None, g_upstream, g_scale, *g_weights)


def _will_run(node) -> bool:
    """Whether autograd will run ``node`` in the backward pass now running (with ``inputs=``
    some nodes are skipped: a gradient left on one would be added in a later pass)."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    return True if will_execute is None else bool(will_execute(node))


def _leaky_backward(ctx, g_new, g_dspk):
    u_twin, u_partner = ctx.saved_tensors
    constants = ctx.constants
    derivative = constants.lif.spike_grad.derivative
    g_new = torch.zeros_like(u_twin) if g_new is None else g_new
    g_partner = None
    if g_dspk is not None:
        g_dspk = g_dspk * constants.factor
        through_twin = g_dspk * derivative(u_twin)
        g_new = g_new + through_twin
        g_partner = through_twin - g_dspk * derivative(u_partner)
    return g_new * constants.beta, (g_new if ctx.has_current else None), g_partner


def _native_leaky(lif, like: torch.Tensor):
    """The C kernel for ``lif``'s steps on tensors like ``like`` (CPU, float32/64, the
    fast-sigmoid surrogate, scalar decay, threshold and spike size), else None."""
    if like.device.type != "cpu" or not isinstance(lif.spike_grad, FastSigmoid):
        return None
    if any(getattr(lif, name).numel() != 1 for name in ("beta", "threshold", "graded_spikes_factor")):
        return None
    return native.kernel(like.dtype, "leaky_difference")


def _native_leaky_forward(ctx, mem_prev, mem, delta, delta_current):
    """The kernel gathers the partner rows itself and returns them for the backward."""
    twins, (beta, thr, factor) = ctx.twins, ctx.constants.numbers
    mem_prev, mem, delta = mem_prev.contiguous(), mem.contiguous(), delta.contiguous()
    current = None if delta_current is None else delta_current.contiguous()
    new, dspk, partner = torch.empty_like(delta), torch.empty_like(delta), torch.empty_like(delta)
    flipped = torch.zeros(delta.shape[0], dtype=torch.int8)
    index, row = twins.kernel_index(), delta[0].numel()
    args = (row, None if index is None else index.data_ptr(), mem_prev.data_ptr(),
            mem.data_ptr(), delta.data_ptr(), None if current is None else current.data_ptr(),
            beta, thr, factor, new.data_ptr(), dspk.data_ptr(), partner.data_ptr(), flipped.data_ptr())
    native.call_elementwise(ctx.constants.native[0], delta.numel(), args, align=row)
    ctx.save_for_backward(partner, new)
    return new, dspk, flipped.nonzero().squeeze(1)


def _native_leaky_backward(ctx, g_new, g_dspk):
    partner, new = ctx.saved_tensors
    (beta, thr, factor), slope = ctx.constants.numbers, ctx.constants.slope
    g_new = None if g_new is None else g_new.contiguous()
    g_dspk = None if g_dspk is None else g_dspk.contiguous()
    g_delta, g_partner = torch.empty_like(new), torch.empty_like(new)
    g_current = torch.empty_like(new) if ctx.has_current else None
    args = (partner.data_ptr(), new.data_ptr(), None if g_new is None else g_new.data_ptr(),
            None if g_dspk is None else g_dspk.data_ptr(), beta, thr, factor, slope,
            g_delta.data_ptr(), None if g_current is None else g_current.data_ptr(),
            g_partner.data_ptr())
    native.call_elementwise(ctx.constants.native[1], new.numel(), args)
    return g_delta, g_current, (None if g_dspk is None else g_partner)


class LinearDifference:
    """``A(delta) * scale``, not computed yet: ``A`` the linear modules ``modules`` applied in
    order (``nn.AvgPool2d``, ``nn.Identity``, ``nn.Linear`` or a zero-padded ``nn.Conv2d``, the
    latter two as their weight's linear map, without bias).

    ``delta (K, ...)``: a difference; ``nominal_outs``: each module's output on the nominal rows
    (for the shapes); ``rows``: :func:`nonzero_rows` of ``delta`` (or more rows); ``scale``:
    ``(C,)`` per output channel (:func:`batch_norm_scale`) or None. The products with the
    weights are taken on ``rows`` only, the gradient for ``delta`` on all rows. Module hooks do
    not run: monitors on the modules see only the nominal rows.

    Give it to :func:`leaky_difference` as the current difference (computed in that node), or
    take :meth:`tensor` (its own node) where something else consumes the difference.
    """

    def __init__(self, modules: Sequence[nn.Module], delta: torch.Tensor,
                 nominal_outs: Sequence[torch.Tensor], rows: torch.Tensor,
                 scale: Optional[torch.Tensor] = None, twins: Optional[TwinLayout] = None):
        # ``twins``: the loop's layout, to build the modules' maps once per loop
        build = lambda: _linear_maps(modules)
        keep, self.maps = build() if twins is None else twins.memo(("maps", *map(id, modules)), build)
        self.shapes = [tuple(nominal_outs[i].shape[1:]) for i in keep]
        self.weights = tuple(modules[i].weight if isinstance(m, _WeightMap) else None
                             for i, m in zip(keep, self.maps))
        self.delta, self.rows, self.scale = delta, rows, scale
        self.inputs, self.unscaled = [], None

    def tensor(self) -> torch.Tensor:
        """``A(delta) * scale`` ``(K, ...)``, zero on the rows not in ``rows``."""
        return _LinearMapOfDifference.apply(self, self.delta, self.scale, *self.weights)

    def rows_forward(self) -> Optional[torch.Tensor]:
        """The value (no autograd), or None when ``rows`` is empty (then it is zero). Keeps what
        :meth:`backward` needs."""
        rows, scale = self.rows, self.scale
        if not rows.numel():
            return None
        h = self.delta.detach()[rows]
        for linear_map, weight in zip(self.maps, self.weights):
            self.inputs.append(h)
            h = linear_map(h, None if weight is None else weight.detach())
        self.unscaled = h
        out = h.new_zeros((self.delta.shape[0],) + self.shapes[-1])
        out[rows] = h if scale is None else h * scale.detach().view(_channel_shape(h))
        return out

    def backward(self, g: Optional[torch.Tensor], needs_delta: bool, needs_scale: bool,
                 needs_weights: Sequence[bool]):
        """Gradients for ``delta``, ``scale`` and the weights from ``g``, the gradient of the value."""
        g_weights = [None] * len(self.weights)
        if g is None:
            return None, None, g_weights
        rows, scale, flipped, g = self.rows, self.scale, self.rows.numel() > 0, g.contiguous()
        g_scale = None
        if scale is not None:
            if needs_scale and flipped:
                g_scale = (g[rows] * self.unscaled).sum([0] + list(range(2, g.dim())))
            g = g * scale.detach().view(_channel_shape(g))
        for i in range(len(self.maps) - 1, -1, -1):
            linear_map, weight = self.maps[i], self.weights[i]
            if weight is not None and needs_weights[i] and flipped:
                g_weights[i] = linear_map.weight_grad(g[rows], self.inputs[i], weight.detach())
            if i == 0 and not needs_delta:
                return None, g_scale, g_weights
            # the input gradient needs the input's shape only: an uninitialized stand-in
            x = self.delta.detach() if i == 0 else g.new_empty((g.shape[0],) + self.shapes[i - 1])
            g = linear_map.input_grad(g, x, None if weight is None else weight.detach())
        return g, g_scale, g_weights


def _linear_maps(modules: Sequence[nn.Module]):
    """The positions of the modules that are not identities, and their maps."""
    maps = [_linear_map(m) for m in modules]
    keep = [i for i, m in enumerate(maps) if m is not None]
    return keep, [maps[i] for i in keep]


def _linear_map(module: nn.Module):
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.AvgPool2d):
        return _PoolMap(module)
    conv = conv_arguments(module)
    if conv is False:
        raise TypeError("modules: expected nn.Linear, a zero-padded nn.Conv2d, nn.AvgPool2d or "
                        f"nn.Identity, got {type(module).__name__}")
    return _WeightMap(conv)


def conv_arguments(layer: nn.Module):
    """None for ``nn.Linear``; ``(stride, padding, dilation, groups)`` for an ``nn.Conv2d`` with
    zero padding given as numbers; False for any other layer."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
    return False


def nonzero_rows(delta: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``delta (K, ...)`` with a non-zero (or NaN) entry, ``(k,)``.

    On a GPU all rows: choosing rows by their values would make the device wait at every layer
    (the products on zero rows cost less than that)."""
    if delta.device.type != "cpu":
        return torch.arange(delta.shape[0], device=delta.device)
    # the row norm (no underflow for spike differences): ~7x faster on a CPU than any() over a
    # float tensor, ~20x faster than the max-norm
    return torch.linalg.vector_norm(delta.flatten(1), dim=1).ne(0).nonzero().squeeze(1)


def batch_norm_nominal(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``bn(x)`` on the nominal rows ``(B, C, ...)``, and the ``(C,)`` inverse standard deviation it
    normalized with (detached), or None where it is not at hand: a subclass (``SyncBatchNorm``
    has its own forward) or forward hooks on ``bn`` or on all modules get the module's own call.

    In training mode this is ``nn.BatchNorm``'s own forward (running statistics, momentum,
    ``num_batches_tracked``) through ``torch.native_batch_norm``, which returns the statistics.
    """
    if (type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # e.g. SyncBatchNorm
            or bn._forward_hooks or bn._forward_pre_hooks or _global_module_hooks()):
        return bn(x), None
    if not bn.training and bn.running_var is not None:
        return bn(x), torch.rsqrt(bn.running_var + bn.eps)
    factor = 0.0 if bn.momentum is None else bn.momentum
    track = bn.training and bn.track_running_stats
    if track and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn._check_input_dim(x)
    out, _, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean if track else None,
                                             bn.running_var if track else None, True, factor, bn.eps)
    return out, invstd


def _global_module_hooks() -> bool:
    from torch.nn.modules import module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def batch_norm_scale(bn: nn.modules.batchnorm._BatchNorm, nominal_in: torch.Tensor,
                     nonzero: bool, invstd: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight * invstd (C,)``: what a batch norm whose twins share the nominal rows'
    statistics multiplies a difference of its input by, per channel; with the batch statistics
    of ``nominal_in (B, C, ...)`` in training mode, the running variance otherwise.

    For a difference zero in value (``nonzero`` False) the gradient through the statistics,
    ``sum(grad * delta)``, is zero, so the detached ``invstd`` of the nominal batch norm serves
    (:func:`batch_norm_nominal`); otherwise the statistics are recomputed with autograd.
    """
    differentiable = torch.is_grad_enabled() and nonzero
    if differentiable or invstd is None:
        with torch.set_grad_enabled(differentiable):
            if bn.training or bn.running_var is None:
                dims = [0] + list(range(2, nominal_in.dim()))
                n = nominal_in.numel() // nominal_in.shape[1]
                centered = nominal_in - (nominal_in.sum(dims) / n).view(_channel_shape(nominal_in))
                var = (centered * centered).sum(dims) / n
            else:
                var = bn.running_var
            invstd = torch.rsqrt(var + bn.eps)
    return invstd * bn.weight if bn.affine else invstd


def shared_batch_norm(bn: nn.modules.batchnorm._BatchNorm, h: torch.Tensor,
                      twins: Optional[TwinLayout]) -> torch.Tensor:
    """Batch norm of ``h (B + K, C, ...)`` (twins as rows) whose statistics come from the nominal
    rows only, as a forward pass without twins computes them (running statistics included).

    The nominal rows take the module's own batch norm; each twin row is its partner's output
    plus the difference of their inputs times :func:`batch_norm_scale`, which is
    zero where no spike flipped upstream.
    """
    if twins is None or not (bn.training or bn.running_mean is None):
        return bn(h)
    nominal = twins.nominal(h)
    out, invstd = batch_norm_nominal(bn, nominal)
    delta = twins.twin(h) - twins.partner(nominal)
    scale = batch_norm_scale(bn, nominal, nonzero_rows(delta).numel() > 0, invstd)
    twin_out = twins.partner(out) + delta * scale.view(_channel_shape(delta))
    return torch.cat([out, twin_out], dim=0)


def _channel_shape(like: torch.Tensor):
    return (1, -1) + (1,) * (like.dim() - 2)


class _LinearMapOfDifference(torch.autograd.Function):
    """:meth:`LinearDifference.tensor` as an autograd node (its tensors are the inputs)."""

    @staticmethod
    def forward(ctx, lazy, delta, scale, *weights):
        ctx.lazy = lazy
        out = lazy.rows_forward()
        return delta.new_zeros((delta.shape[0],) + lazy.shapes[-1]) if out is None else out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        g_delta, g_scale, g_weights = ctx.lazy.backward(g, needs[1], needs[2], needs[3:])
        return None, g_delta, g_scale, *g_weights


class _WeightMap:
    """``x @ W.T`` (``conv`` None) or ``conv2d(x, W)`` with ``conv = (stride, padding, dilation,
    groups)``, and its input and weight gradients."""

    def __init__(self, conv):
        self.conv = conv

    def __call__(self, x, weight):
        if self.conv is None:
            return x @ weight.t()
        stride, padding, dilation, groups = self.conv
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    def input_grad(self, g, x, weight):
        return g @ weight if self.conv is None else self._conv_backward(g, x, weight, 0)

    def weight_grad(self, g, x, weight):
        return g.t() @ x if self.conv is None else self._conv_backward(g, x, weight, 1)

    def _conv_backward(self, g, x, weight, which: int):
        stride, padding, dilation, groups = self.conv
        mask = [which == 0, which == 1, False]
        return torch.ops.aten.convolution_backward(g, x, weight, None, stride, padding, dilation,
                                                   False, [0] * len(stride), groups, mask)[which]


class _PoolMap:
    """``avg_pool2d`` with an ``nn.AvgPool2d``'s settings, and its input gradient."""

    def __init__(self, pool: nn.AvgPool2d):
        self.args = (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                     pool.count_include_pad, pool.divisor_override)

    def __call__(self, x, _weight=None):
        return F.avg_pool2d(x, *self.args)

    def input_grad(self, g, x, _weight=None):
        kernel, stride, padding, ceil_mode, include_pad, divisor = self.args
        pair = torch.nn.modules.utils._pair
        kernel, stride, padding = pair(kernel), pair(stride or kernel), pair(padding)
        fn = None
        if (kernel, stride, padding, divisor) == ((2, 2), (2, 2), (0, 0), None) and not ceil_mode \
                and g.device.type == "cpu" and g.dtype == x.dtype and g.dim() == 4:
            fn = native.function(g.dtype, "avg_pool2x2_backward")
        if fn is None:
            return torch.ops.aten.avg_pool2d_backward(g, x, kernel, stride, padding, ceil_mode,
                                                      include_pad, divisor)
        g, out = g.contiguous(), g.new_empty(x.shape)
        fn(x.shape[0] * x.shape[1], x.shape[2], x.shape[3], g.data_ptr(), out.data_ptr())
        return out
