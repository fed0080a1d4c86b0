"""``create_snn``: seed 001's factory, by model type name."""
from __future__ import annotations

from typing import List

from torch import nn

from .mlp import SpikingMLP
from .recurrent import RecurrentSpikingMLP

MODEL_TYPES = {"feedforward": SpikingMLP, "recurrent": RecurrentSpikingMLP}


def create_snn(model_type: str, input_dim: int, hidden_dims: List[int], num_classes: int,
               **kwargs) -> nn.Module:
    """Build a seed model: ``"feedforward"`` (:class:`SpikingMLP`) or ``"recurrent"``
    (:class:`RecurrentSpikingMLP`); ``kwargs`` go to its constructor."""
    try:
        cls = MODEL_TYPES[model_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"model_type: expected one of {', '.join(MODEL_TYPES)}, got {model_type!r}"
        ) from None
    return cls(input_dim, hidden_dims, num_classes, **kwargs)
