"""Depth-wise gain: how a perturbation grows from layer to layer within a time step.

For a deep feedforward SNN the temporal Jacobian is block lower-triangular, so its temporal
exponents are single-neuron averages (ln beta below threshold) and say little about trainability.
What governs it is the propagation through depth ("deep information propagation"): at every time
step a random unit tangent is put on the first layer's continuous state, pushed through one step
by forward-mode AD (surrogate derivative included), and the tangent norms that reach each layer's
new state are compared: ``gain[l] = ln(|t_{l+1}| / |t_l|)`` nats per layer, averaged over steps
(E[log]) and samples. Large positive values predict exploding, large negative vanishing gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from .._checks import check_tensor
from ..dynamics import state_spec_of, unroll


@dataclass
class DepthGainResult:
    """``per_layer``: ``(L - 1,)`` gain from layer l to l+1; ``per_sample``: ``(B, L - 1)``;
    ``mean``: average over depth, nats per layer."""

    per_layer: torch.Tensor
    per_sample: torch.Tensor
    mean: float

    def __str__(self) -> str:
        gains = ", ".join(f"{float(g):+.3f}" for g in self.per_layer.detach())
        return f"depth-wise gain {self.mean:+.4f} nats/layer (layer to layer: [{gains}])"


def depthwise_gain(stepper, x: torch.Tensor, *, generator=None) -> DepthGainResult:
    """Layer-to-layer growth of a first-layer perturbation, for a stepper over ``x`` ``(T, B, ...)``."""
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first")
    B = x.shape[1]
    state = stepper.init_state(B, x.device, x.dtype)
    spec = state_spec_of(stepper, state)
    layers = sorted({s.layer for s in spec if s.continuous})
    if len(layers) < 2:
        raise ValueError(f"stepper: depth-wise gain needs at least 2 layers with continuous state, got {len(layers)}")
    by_layer = [[i for i, s in enumerate(spec) if s.continuous and s.layer == layer] for layer in layers]
    first = by_layer[0]
    logs = []

    def seed(st):
        """Fresh unit tangent on the first layer's state (per sample), zero elsewhere."""
        primal = [fwAD.unpack_dual(s).primal if fwAD.unpack_dual(s).tangent is not None else s for s in st]
        noise = {i: torch.randn(primal[i].shape, generator=generator, dtype=primal[i].dtype).to(primal[i].device)
                 for i in first}
        norm = torch.sqrt(sum(n.pow(2).flatten(1).sum(1) for n in noise.values()))
        return tuple(fwAD.make_dual(p, noise[i] / norm.view(-1, *[1] * (p.dim() - 1)) if i in noise
                                    else torch.zeros_like(p)) for i, p in enumerate(primal))

    def measure(t, out_t, st):
        tangents = [fwAD.unpack_dual(s).tangent for s in st]
        norms = torch.stack([torch.sqrt(sum(tangents[i].pow(2).flatten(1).sum(1) for i in group))
                             for group in by_layer], dim=1)  # (B, L)
        logs.append(torch.log(norms.clamp_min(torch.finfo(norms.dtype).tiny)))
        return seed(st)

    with fwAD.dual_level():
        unroll(stepper, x, seed(state), on_step=measure)
    log_norms = torch.stack(logs)  # (T, B, L)
    per_sample = (log_norms[:, :, 1:] - log_norms[:, :, :-1]).mean(0)  # (B, L - 1)
    per_layer = per_sample.mean(0)
    return DepthGainResult(per_layer, per_sample, float(per_layer.detach().mean()))
