"""The seed models, each a stepper on the one time loop (:mod:`stablespike.dynamics`)."""
from .factory import MODEL_TYPES, create_snn
from .mlp import LyapunovSNN, SpikingMLP
from .recurrent import RecurrentLyapunovSNN, RecurrentSpikingMLP
from .vgg import SpikingVGG, SpikingVGGBlock

__all__ = [
    "MODEL_TYPES", "create_snn", "LyapunovSNN", "SpikingMLP", "RecurrentLyapunovSNN",
    "RecurrentSpikingMLP", "SpikingVGG", "SpikingVGGBlock",
]
