"""Run a stepper in another floating-point precision, with gradients reaching its own parameters.

A finite-difference estimate with a small ``eps`` subtracts two nearly equal trajectories; in
float32 that difference is quantized (REFERENCES.md: eps=1e-6 gives NaN). Running both
trajectories in float64 fixes it. The parameters are cast differentiably (``p.double()``), so the
estimate stays a valid loss term for the float32 model; updated buffers (batch-norm running
statistics) are written back to the originals when the run ends.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch
from torch import nn


class _StepCall(nn.Module):
    """Makes ``stepper.step`` the ``forward`` so that ``torch.func.functional_call`` can swap tensors."""

    def __init__(self, stepper: nn.Module):
        super().__init__()
        self.stepper = stepper

    def forward(self, x_t, state, twins=None):
        if twins is None:
            return self.stepper.step(x_t, state)
        return self.stepper.step(x_t, state, twins=twins)


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
        self._call = _StepCall(stepper)
        self.dtype = dtype
        self.supports_twins = getattr(stepper, "supports_twins", False)
        self.twin_state_inplace = getattr(stepper, "twin_state_inplace", False)
        self._tensors: Dict[str, torch.Tensor] = {}
        for name, p in stepper.named_parameters():
            self._tensors["stepper." + name] = p.to(dtype) if p.is_floating_point() else p
        self._buffers = {}
        for name, b in stepper.named_buffers():
            if b.is_floating_point() and b.numel() > 0:
                cast = b.detach().to(dtype).clone()
                self._buffers[name] = (b, cast)
                self._tensors["stepper." + name] = cast

    def init_state(self, batch_size, device, dtype):
        return self._inner.init_state(batch_size, device, self.dtype)

    def state_spec(self):
        return self._inner.state_spec()

    def step(self, x_t, state, twins=None):
        return torch.func.functional_call(
            self._call, self._tensors, (x_t.to(self.dtype), state, twins), strict=False
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for original, cast in self._buffers.values():
                original.copy_(cast)
        return False


def maybe_cast(stepper, dtype):
    """A context giving ``stepper`` cast to ``dtype``, or ``stepper`` itself when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext(stepper)
    return CastStepper(stepper, dtype)
