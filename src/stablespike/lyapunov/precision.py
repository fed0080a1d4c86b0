"""Run a model or a stepper in another floating-point precision, with gradients reaching its own parameters.

A finite-difference estimate with a small ``eps`` subtracts two nearly equal trajectories; in
float32 that difference is quantized (REFERENCES.md: eps=1e-6 gives NaN). Running both
trajectories in float64 fixes it. The parameters are cast differentiably (``p.double()``), so the
estimate stays a valid loss term for the float32 model; updated buffers (batch-norm running
statistics) are written back to the originals when the run ends.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Call(nn.Module):
    """Makes ``fn(model, *args)`` a ``forward`` so that ``torch.func.functional_call`` can swap
    the model's tensors (``model.<name>``) for the duration of one call."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def _cast_tensors(model: nn.Module, dtype: torch.dtype):
    """``({"model.<name>": cast tensor}, [(original buffer, cast copy)])``: floating parameters
    cast differentiably, floating persistent buffers (running statistics) as copies to write back."""
    tensors, buffers = {}, []
    for name, p in model.named_parameters():
        tensors["model." + name] = p.to(dtype) if p.is_floating_point() else p
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if name in persistent and b.is_floating_point() and b.numel() > 0:
            cast = b.detach().to(dtype).clone()
            buffers.append((b, cast))
            tensors["model." + name] = cast
    return tensors, buffers


@contextlib.contextmanager
def cast_forward(model: nn.Module, forward, dtype: torch.dtype):
    """A ``forward(model, x)`` that runs ``model`` with its parameters and persistent buffers in
    ``dtype``; on exit the cast buffers (batch-norm running statistics) are written back."""
    tensors, buffers = _cast_tensors(model, dtype)
    call = _Call(model, forward)
    try:
        yield lambda m, x: torch.func.functional_call(call, tensors, (x,), strict=False)
    finally:
        with torch.no_grad():
            for original, cast in buffers:
                original.copy_(cast)


class CastStepper:
    """A view of ``stepper`` (an ``nn.Module``) whose steps run in ``dtype``.

    Use it as a context manager: on exit the cast buffers are copied back into the module.
    """

    def __init__(self, stepper: nn.Module, dtype: torch.dtype):
        if not isinstance(stepper, nn.Module):
            raise TypeError(
                f"twin_dtype: casting needs an nn.Module stepper, got {type(stepper).__name__}; "
                "build the stepper in the wanted dtype instead"
            )
        self._inner = stepper
        self._call = _Call(stepper, lambda m, x_t, state: m.step(x_t, state))
        self.dtype = dtype
        self._tensors, self._buffers = _cast_tensors(stepper, dtype)

    def init_state(self, batch_size, device, dtype):
        return self._inner.init_state(batch_size, device, self.dtype)

    def state_spec(self):
        return self._inner.state_spec()

    def step(self, x_t, state):
        return torch.func.functional_call(self._call, self._tensors, (x_t.to(self.dtype), state),
                                          strict=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for original, cast in self._buffers:
                original.copy_(cast)
        return False


def maybe_cast(stepper, dtype):
    """A context giving ``stepper`` cast to ``dtype``, or ``stepper`` itself when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext(stepper)
    return CastStepper(stepper, dtype)
