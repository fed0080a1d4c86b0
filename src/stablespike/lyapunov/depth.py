"""Depth-wise gain: how a perturbation grows from layer to layer within a time step.

For a deep feedforward SNN the temporal Jacobian is block lower-triangular, so its temporal
exponents are single-neuron averages (ln beta below threshold) and say little about trainability.
What governs it is the propagation through depth ("deep information propagation"): at every time
step a random unit tangent is put on the first layer's continuous state, pushed through one step
by forward-mode AD (surrogate derivative included), and the tangent norms that reach each layer's
new state are compared: ``gain[l] = ln(|t_{l+1}| / |t_l|)`` nats per layer, averaged over steps
(E[log]) and samples. Large positive values predict exploding, large negative vanishing gradients.

On a module with spiking neurons the same is done through the model's own forward, with each
neuron's own surrogate (:mod:`stablespike.forward_mode`): before every step the first neuron's
state gets a fresh unit tangent and every other neuron's a zero one (spikes fed back included),
and after the step the tangent norm of each neuron's state is read (the first step's state is
where it starts, so ``T - 1`` steps are measured). Multi-step neurons run one step at a time
(:mod:`stablespike.neuron_runs`); the tangent reaches a layer through its input as it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from typing import Callable, Dict, List, Optional, Tuple

from .._checks import check_generator, check_tensor
from ..degenerate import FlooredLog, warn_degenerate
from ..dynamics import state_spec_of, unroll
from ..forward_mode import forward_mode_surrogates
from ..neuron_runs import Neuron, NeuronRun
from ..neurons import find_layers
from ..twins import drawing_aside, random_direction
from .drivers import call_model, check_batch_dim, require_stepper, uses_neurons


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


def depthwise_gain(model, x: torch.Tensor, *, forward: Optional[Callable] = None, batch_dim: int = 1,
                   generator=None) -> DepthGainResult:
    """Layer-to-layer growth of a first-layer perturbation: for a module with spiking neurons,
    run through ``forward(model, x)`` (default ``model(x)``) with the samples along ``batch_dim``;
    for a stepper, over a time-first ``x (T, B, ...)``."""
    check_generator(generator)
    if uses_neurons(model, forward):
        log = FlooredLog()
        with drawing_aside(generator) as generator:  # the model's own draws stay a plain call's
            per_sample = _module_gain(model, x, forward or call_model, check_batch_dim(x, batch_dim), generator, log)
        return _result(per_sample, log)
    require_stepper(model)
    stepper = model
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first", floating=True)
    B = x.shape[1]
    state = stepper.init_state(B, x.device, x.dtype)
    spec = state_spec_of(stepper, state)
    layers = sorted({s.layer for s in spec if s.continuous})
    if len(layers) < 2:
        raise ValueError(f"stepper: depth-wise gain needs at least 2 layers with continuous state, got {len(layers)}")
    by_layer = [[i for i, s in enumerate(spec) if s.continuous and s.layer == layer] for layer in layers]
    first = by_layer[0]
    logs, log = [], FlooredLog()

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
        logs.append(log(norms))
        return seed(st)

    with fwAD.dual_level():
        unroll(stepper, x, seed(state), on_step=measure)
    log_norms = torch.stack(logs)  # (T, B, L)
    return _result((log_norms[:, :, 1:] - log_norms[:, :, :-1]).mean(0), log)  # (B, L - 1)


def _result(per_sample: torch.Tensor, log: FlooredLog) -> DepthGainResult:
    warn_degenerate("depthwise_gain", per_sample, log, "Use float64 inputs and model.",
                    "A layer passed no perturbation on (e.g. silent neurons with a zero surrogate "
                    "gradient): its gain is -inf in exact arithmetic.")
    per_layer = per_sample.mean(0)
    return DepthGainResult(per_layer, per_sample, float(per_layer.detach().mean()))


class _ModuleGain(NeuronRun):
    """Seeds a unit tangent on the first neuron before every step and reads every neuron's."""

    def __init__(self, model, layers, batch: int, generator, log: FlooredLog):
        super().__init__(model, layers, list(range(len(layers))), batch, batch, joint=True)
        self.generator, self.log = generator, log
        self.logs: Dict[Tuple[int, int], torch.Tensor] = {}  # (step, layer) -> (B,) log norm

    def due(self, step: int) -> bool:
        return True

    def replacements(self, step: int, neurons: List[Neuron]) -> None:
        if step >= 0:
            self._measure(step, neurons)
        for n in neurons:
            primals = [fwAD.unpack_dual(s).primal for s in n.state.values()]
            tangents = (random_direction([p.shape for p in primals], 1.0, primals[0], self.generator)
                        if n.group == 0 else [torch.zeros_like(p) for p in primals])
            for s, p, t in zip(n.state.values(), primals, tangents):
                n.required[id(s)] = fwAD.make_dual(p, t)
            if n.spikes is not None:
                spikes = fwAD.unpack_dual(n.spikes).primal
                n.optional[id(n.spikes)] = fwAD.make_dual(spikes, torch.zeros_like(spikes))

    def _measure(self, step: int, neurons: List[Neuron]) -> None:
        for n in neurons:
            sq = sum(_tangent(s).pow(2).flatten(1).sum(1) for s in n.state.values())
            self.logs[(step, n.group)] = 0.5 * self.log(sq)

    def finish(self) -> None:
        for group in self.open_intervals():
            self._measure(group[0].calls - 2, group)

    def per_sample(self) -> torch.Tensor:
        layers = len(self.chosen)
        steps = sorted({s for s, _ in self.logs if all((s, g) in self.logs for g in range(layers))})
        log_norms = torch.stack([torch.stack([self.logs[(s, g)] for g in range(layers)], 1) for s in steps])
        return (log_norms[:, :, 1:] - log_norms[:, :, :-1]).mean(0)  # (B, L - 1)


def _tangent(s: torch.Tensor) -> torch.Tensor:
    t = fwAD.unpack_dual(s).tangent
    return torch.zeros_like(s) if t is None else t


def _module_gain(model, x, forward, batch_dim: int, generator, log: FlooredLog) -> torch.Tensor:
    layers = find_layers(model)
    if len(layers) < 2:
        raise ValueError(f"model: depth-wise gain needs at least 2 spiking-neuron layers, got {len(layers)}")
    run = _ModuleGain(model, layers, x.shape[batch_dim], generator, log)
    with fwAD.dual_level(), forward_mode_surrogates(layers):
        run.run(forward, x)
    return run.per_sample()
