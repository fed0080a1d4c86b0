"""Which driver an estimator uses for a model, and the checks every module estimate shares."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_tensor
from ..dynamics import is_stepper
from ..neurons import DEFAULT_REGISTRY


def uses_neurons(model, forward) -> bool:
    """A module containing spiking neurons runs through its forward (the module driver); a
    module that is also a stepper without a forward of its own, given no ``forward``, and any
    other stepper are unrolled (the stepper driver)."""
    if not isinstance(model, nn.Module) or not any(
            DEFAULT_REGISTRY.adapter_for(m) is not None for m in model.modules()):
        return False
    own_forward = type(model).forward is not nn.Module.forward
    return forward is not None or own_forward or not is_stepper(model)


def require_stepper(model) -> None:
    """A ValueError saying what was looked for, when ``model`` is neither kind."""
    if is_stepper(model):
        return
    frameworks = [a.framework for a in DEFAULT_REGISTRY.adapters()]
    looked_for = ("neurons of " + ", ".join(frameworks)) if frameworks else "registered neuron types"
    passed = _passed_over(model)
    found = (f"; it has {', '.join(passed)}, of a framework stablespike reads, but with no firing "
             "threshold where the adapter looks (a leaky integrator, or a cell that keeps it "
             "elsewhere, such as norse's LIFRefracCell in p.lif)") if passed else ""
    raise ValueError(
        f"model: expected an nn.Module containing spiking neurons or a stepper with init_state() "
        f"and step(), got {type(model).__name__} with neither; stablespike looks for "
        f"{looked_for}{found} (register other neuron types with stablespike.register_neuron)")


def _passed_over(model) -> list:
    """``'name (framework Type)'`` for the modules of a known framework's neuron classes that
    its adapter declined (``accepts`` false)."""
    if not isinstance(model, nn.Module):
        return []
    return [f"{name or 'the model'} ({adapter.framework} {type(module).__name__})"
            for name, module in model.named_modules() for adapter in DEFAULT_REGISTRY.adapters()
            if isinstance(module, adapter.types) and not adapter.accepts(module)]


def check_batch_dim(x, batch_dim) -> int:
    """``x`` is a finite non-empty tensor with at least one sample along ``batch_dim``; returns
    ``batch_dim`` as a non-negative index."""
    check_tensor(x, "x", ndims=range(1, 9), layout="with the samples along batch_dim")
    if isinstance(batch_dim, bool) or int(batch_dim) != batch_dim or not -x.dim() <= int(batch_dim) < x.dim():
        raise ValueError(f"batch_dim: expected a dimension of x (shape {tuple(x.shape)}), "
                         f"in [{-x.dim()}, {x.dim() - 1}], got {batch_dim!r}")
    return int(batch_dim) % x.dim()


def call_model(model: nn.Module, x: torch.Tensor):
    """The default ``forward``: ``model(x)``."""
    return model(x)
