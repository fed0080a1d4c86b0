"""stablespike: diagnose and stabilize the training of deep spiking neural networks.

Public API, re-exported here; the seed documents' names (``LyapunovSNN``, ``RecurrentLyapunovSNN``,
``create_snn``, ``SpikingVGG``, ``compute_lyap_reg_loss``) keep their meaning.
"""
from .dynamics import StateSpec, Stepper, Unrolled, unroll
from .lyapunov import (
    PENALTY_KINDS,
    FiniteDifferenceResult,
    LyapunovRegularizer,
    DepthGainResult,
    DynamicsReport,
    TangentResult,
    analyze_dynamics,
    compute_lyap_reg_loss,
    depthwise_gain,
    finite_difference_lyapunov,
    tangent_spectrum,
)
from .models import (
    LyapunovSNN,
    RecurrentLyapunovSNN,
    RecurrentSpikingMLP,
    SpikingMLP,
    SpikingVGG,
    SpikingVGGBlock,
    create_snn,
)
from .monitor import (AttributeMonitor, GradInputMonitor, GradOutputMonitor, InputMonitor,
                      OutputMonitor)
from .neurons import find_neurons, register_neuron
from .stats import FiringRate, GradNorm, MembraneStats, Statistic, parameter_gradient_norm
from .streaming import FiringRateMonitor, GradNormMonitor, LayerGradNorms, MembraneMonitor
from .surrogate import FastSigmoid, fast_sigmoid
from .rules import Pathology, Severity, Thresholds
from .profiler import LayerStats, ProfileReport, SpikeProfiler
from .stability import (StabilityMetrics, StabilityMonitor, analyze_weight_spectrum,
                        compute_spectral_radius, effective_condition)
from .callbacks import DiagnosticsCallback, TensorBoardSink
from .init import CalibrationReport, ThresholdBalancer, calibrate, fluctuation_init
from .data import load_dataset
from .train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "StateSpec", "Stepper", "Unrolled", "unroll",
    "PENALTY_KINDS", "FiniteDifferenceResult", "LyapunovRegularizer", "compute_lyap_reg_loss",
    "finite_difference_lyapunov", "TangentResult", "tangent_spectrum",
    "DepthGainResult", "depthwise_gain", "DynamicsReport", "analyze_dynamics",
    "LyapunovSNN", "RecurrentLyapunovSNN", "RecurrentSpikingMLP", "SpikingMLP", "SpikingVGG",
    "SpikingVGGBlock", "create_snn",
    "FastSigmoid", "fast_sigmoid",
    "OutputMonitor", "InputMonitor", "AttributeMonitor", "GradOutputMonitor", "GradInputMonitor",
    "find_neurons", "register_neuron", "FiringRate", "MembraneStats", "GradNorm", "Statistic",
    "parameter_gradient_norm", "FiringRateMonitor", "MembraneMonitor", "GradNormMonitor",
    "LayerGradNorms",
    "Pathology", "Severity", "Thresholds", "LayerStats", "ProfileReport", "SpikeProfiler",
    "StabilityMetrics", "StabilityMonitor", "analyze_weight_spectrum", "compute_spectral_radius",
    "effective_condition", "DiagnosticsCallback", "TensorBoardSink", "CalibrationReport", "ThresholdBalancer",
    "calibrate", "fluctuation_init", "load_dataset", "TrainConfig", "fit", "evaluate",
]
