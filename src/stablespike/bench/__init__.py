"""Benchmarks of the science: the depth-scaling experiment (seed 002)."""
from .depth_scaling import SweepConfig, run_sweep

__all__ = ["SweepConfig", "run_sweep"]
