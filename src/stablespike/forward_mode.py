"""Forward-mode derivatives for any framework's surrogate spike function.

The tangent spectrum and the depth-wise gain push tangents through a model by forward-mode
automatic differentiation. The surrogate spike functions of snnTorch, spikingjelly and norse are
``torch.autograd.Function`` subclasses that define a backward but no ``jvp``, so forward mode
stops at them (``NotImplementedError``). A spike function is elementwise: its Jacobian is
diagonal, so its Jacobian-vector product equals its vector-Jacobian product. While
:func:`forward_mode_surrogates` is active, each neuron's own surrogate is wrapped so that its
forward-mode derivative is its own backward applied to the tangent: the surrogate the user
chose, with its own shape and width, and nothing else changes.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, List, Sequence

import torch
from torch import nn

from .neurons import Layer

# where each framework's neuron keeps its spike function
_ATTRIBUTES = {"snntorch": "spike_grad", "spikingjelly": "surrogate_function"}
# norse calls module-level functions by name from its threshold module
_NORSE_THRESHOLD = "norse.torch.functional.threshold"
_NORSE_FUNCTIONS = ("superspike_fn", "triangle_fn", "heavi_tanh_fn", "heavi_circ_fn", "heavi_erfc_fn")


def _vjp(fn: Callable, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v^T J`` of the elementwise ``fn`` at ``u`` (= ``J v``: J is diagonal). Where grad mode
    is on, differentiable in ``v`` and in ``u``: a penalty on the tangent exponents reaches the
    weights before a spike through the surrogate's slope ``s'(u)`` too (through ``v`` alone,
    the first layer's gradient came out 0)."""
    graph = torch.is_grad_enabled() and (u.requires_grad or v.requires_grad)
    with torch.enable_grad():
        at = u if graph and u.requires_grad else u.detach().requires_grad_(True)
        out = fn(at)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return torch.zeros_like(v)  # a spike function without a surrogate (Heaviside)
        (grad,) = torch.autograd.grad(out, at, v.to(out.dtype), create_graph=graph)
    return grad.to(v.dtype)


class _ElementwiseSpike(torch.autograd.Function):
    """``fn(u)`` with both derivatives taken from ``fn``'s own backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, fn: Callable) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(u)
        ctx.save_for_forward(u)
        return fn(u)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (u,) = ctx.saved_tensors
        return _vjp(ctx.fn, u, grad_out), None

    @staticmethod
    def jvp(ctx, u_tangent: torch.Tensor, _fn_tangent):
        (u,) = ctx.saved_tensors
        return _vjp(ctx.fn, u, u_tangent)


class WithForwardMode:
    """A spike function ``fn`` that also has a forward-mode derivative (extra arguments, such as
    norse's ``alpha``, are passed through)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, u: torch.Tensor, *args):
        fn = self.fn if not args else (lambda x: self.fn(x, *args))
        return _ElementwiseSpike.apply(u, fn)


class ModuleWithForwardMode(nn.Module, WithForwardMode):
    """The same for a spike function that is a module (spikingjelly's surrogates)."""

    def __init__(self, fn: nn.Module):
        nn.Module.__init__(self)
        self.fn = fn

    def forward(self, u: torch.Tensor, *args):
        return WithForwardMode.__call__(self, u, *args)


def _wrapped(fn):
    return ModuleWithForwardMode(fn) if isinstance(fn, nn.Module) else WithForwardMode(fn)


@contextlib.contextmanager
def forward_mode_surrogates(layers: Sequence[Layer]) -> Iterator[None]:
    """Within the block, the spike functions of ``layers`` have forward-mode derivatives."""
    undo: List[Callable[[], None]] = []
    try:
        for layer in layers:
            name = _ATTRIBUTES.get(layer.adapter.framework if layer.adapter else "")
            fn = getattr(layer.module, name, None) if name else None
            if fn is not None and not isinstance(fn, WithForwardMode):
                setattr(layer.module, name, _wrapped(fn))
                undo.append(lambda m=layer.module, n=name, f=fn: setattr(m, n, f))
        if any(layer.adapter and layer.adapter.framework == "norse" for layer in layers):
            threshold = importlib.import_module(_NORSE_THRESHOLD)
            for fname in _NORSE_FUNCTIONS:
                fn = getattr(threshold, fname, None)
                if fn is not None and not isinstance(fn, WithForwardMode):
                    setattr(threshold, fname, _wrapped(fn))
                    undo.append(lambda n=fname, f=fn: setattr(threshold, n, f))
        yield
    finally:
        for restore in reversed(undo):
            restore()
