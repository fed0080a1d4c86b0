"""Recurrent spiking MLP (seed 001 ``RecurrentLyapunovSNN``): Linear -> snnTorch RSynaptic layers."""
from __future__ import annotations

from typing import Any, List, Optional

import snntorch as snn
import torch
from torch import nn

from .._checks import check_positive, check_unit_interval
from ..dynamics import StateSpec
from ..surrogate import fast_sigmoid
from .base import SequenceModel, untracked, zeros_state

_KINDS = ("spike", "synaptic", "membrane")


class RecurrentSpikingMLP(SequenceModel):
    """Layers of recurrent synaptic LIF neurons (all-to-all recurrent weights, subtractive reset).

    Args: as :class:`~stablespike.models.SpikingMLP`, with ``alpha`` the synaptic current decay and
    ``beta`` the membrane decay (seed defaults 0.9 and 0.85).

    State: per layer ``(spk_l, syn_l, mem_l)``, each ``(B, H_l)``; the Lyapunov twins perturb and
    measure synaptic currents and membranes (as the seed), never spikes.
    """

    def __init__(self, input_dim: int, hidden_dims: List[int], num_classes: int,
                 alpha: float = 0.9, beta: float = 0.85, threshold: float = 1.0,
                 spike_grad: Optional[Any] = None):
        super().__init__(input_dim, hidden_dims, num_classes)
        alpha, beta = check_unit_interval(alpha, "alpha"), check_unit_interval(beta, "beta")
        self.alpha, self.beta, self.threshold = alpha, beta, check_positive(threshold, "threshold")
        spike_grad = spike_grad or fast_sigmoid(25)
        self.neurons = nn.ModuleList(
            untracked(snn.RSynaptic(alpha=alpha, beta=beta, threshold=threshold,
                                    spike_grad=spike_grad, init_hidden=False,
                                    reset_mechanism="subtract", all_to_all=True,
                                    linear_features=h))
            for h in self.hidden_dims)
        self._init_weights()

    # --- stepper protocol -------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None):
        return zeros_state([(h,) for h in self.hidden_dims for _ in _KINDS], batch_size, device, dtype)

    def state_spec(self):
        return tuple(StateSpec(i, kind) for i in range(self.num_layers) for kind in _KINDS)

    def step(self, x_t: torch.Tensor, state):
        """One step: ``x_t (B, D)`` -> ``(spikes (B, H_last), state)``."""
        h, new_state = x_t, []
        for i in range(self.num_layers):
            spk, syn, mem = self.neurons[i](self.linears[i](h), *state[3 * i: 3 * i + 3])
            new_state += [spk, syn, mem]
            h = spk
        return h, tuple(new_state)


RecurrentLyapunovSNN = RecurrentSpikingMLP
