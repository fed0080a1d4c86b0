"""Spiking MLP (seed 001 ``LyapunovSNN``): Linear -> snnTorch Leaky layers -> time-summed spikes -> readout."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from ..dynamics import StateSpec
from .base import SequenceModel, leaky, zeros_state


class SpikingMLP(SequenceModel):
    """Multi-layer LIF network (subtractive reset), a stepper and a seed-compatible classifier.

    Args:
        input_dim: features per time step ``D``.
        hidden_dims: widths of the LIF layers, e.g. ``[256, 256]``.
        num_classes: readout size.
        beta: membrane decay; threshold: firing threshold.
        spike_grad: surrogate (default: fast sigmoid, slope 25, as the seeds).
        dropout: dropout on each layer's spikes during training (masks shared by Lyapunov twins).

    State: ``(mem_0, ..., mem_{L-1}, spk_0, ..., spk_{L-1})``, each ``(B, H_l)``.
    """

    def __init__(self, input_dim: int, hidden_dims: List[int], num_classes: int,
                 beta: float = 0.9, threshold: float = 1.0, spike_grad: Optional[Any] = None,
                 dropout: float = 0.0):
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        super().__init__(input_dim, hidden_dims, num_classes)
        self.beta, self.threshold, self.dropout_p = beta, threshold, float(dropout)
        self.lifs = nn.ModuleList(leaky(beta, threshold, spike_grad) for _ in range(self.num_layers))
        # seed 001: dropout on each layer's spikes, a new mask per step (twins share it)
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(self.num_layers)) if dropout > 0 else None
        self._init_weights()

    # --- stepper protocol -------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None):
        return zeros_state([(h,) for h in self.hidden_dims] * 2, batch_size, device, dtype)

    def state_spec(self):
        L = self.num_layers
        return tuple(StateSpec(i, "membrane") for i in range(L)) + tuple(
            StateSpec(i, "spike") for i in range(L))

    def step(self, x_t: torch.Tensor, state):
        """One step: ``x_t (B, D)``, state ``(B, H_l)`` tensors -> ``(spikes (B, H_last), state)``."""
        h, mems, spikes = x_t, [], []
        for i in range(self.num_layers):
            spk, mem = self.lifs[i](self.linears[i](h), state[i])
            h = self.dropouts[i](spk) if self.dropouts is not None else spk
            mems.append(mem)
            spikes.append(spk)
        return h, tuple(mems) + tuple(spikes)


LyapunovSNN = SpikingMLP
