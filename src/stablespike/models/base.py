"""What the seed models share: building snnTorch neurons, and the seed-style ``forward``.

Every model is an ordinary module of snnTorch neurons, stepped by the one time loop
(:mod:`stablespike.dynamics`; the step knows nothing of Lyapunov twins). With
``compute_lyapunov=True`` its ``forward`` hands its own plain forward to
:func:`~stablespike.lyapunov.finite_difference_lyapunov`, exactly as a user's model would be.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import snntorch as snn
import torch
from torch import nn

from .._checks import check_int, check_positive, check_size, check_tensor, check_unit_interval
from ..dynamics import batch_first_to_time_first, state_spec_of, unroll
from ..lyapunov.finite_difference import finite_difference_lyapunov
from ..surrogate import fast_sigmoid


def untracked(neuron: nn.Module) -> nn.Module:
    """Remove ``neuron`` from snnTorch's global ``SpikingNeuron.instances`` list.

    snnTorch appends every neuron ever built to that list, which then grows without bound
    (REFERENCES.md section 2); our models pass state explicitly and never need it.
    """
    instances = snn.SpikingNeuron.instances
    for i in range(len(instances) - 1, -1, -1):
        if instances[i] is neuron:
            del instances[i]
    return neuron


def leaky(beta: float, threshold: float, spike_grad) -> nn.Module:
    """An snnTorch ``Leaky`` neuron with subtractive reset and explicit state, as the seeds use."""
    beta, threshold = check_unit_interval(beta, "beta"), check_positive(threshold, "threshold")
    return untracked(snn.Leaky(beta=beta, threshold=threshold,
                               spike_grad=spike_grad or fast_sigmoid(25),
                               init_hidden=False, reset_mechanism="subtract"))


def check_dims(hidden_dims, name: str = "hidden_dims") -> List[int]:
    """A non-empty list of positive layer widths."""
    try:
        dims = [int(d) for d in hidden_dims]
        ok = len(dims) > 0 and all(d > 0 and d == h for d, h in zip(dims, hidden_dims))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a non-empty list of positive layer widths, got {hidden_dims!r}")
    return dims


class SeedModel(nn.Module):
    """Base of the seed models: a stepper whose ``forward`` is the seeds' ``forward``.

    Subclasses implement ``_logits(outputs (T, B, ...)) -> (B, C)`` and the stepper protocol.
    """

    def _classify(self, x_tf: torch.Tensor, record_states: bool) -> Tuple[torch.Tensor, ...]:
        """The plain forward on a time-first ``x_tf (T, B, ...)``: ``(logits (B, C),)``, then with
        ``record_states`` the per-layer spikes and membranes, each ``(B, T, ...)``."""
        run = unroll(self, x_tf, record_states=record_states)
        logits = self._logits(run.outputs)
        if not record_states:
            return (logits,)
        spec = state_spec_of(self, run.states[0])
        stacked = [torch.stack([s[i] for s in run.states], dim=1).detach() for i in range(len(spec))]
        spikes = tuple(x for x, s in zip(stacked, spec) if s.kind == "spike")
        mems = tuple(x for x, s in zip(stacked, spec) if s.kind == "membrane")
        return (logits,) + spikes + mems

    def _forward(self, x_tf: torch.Tensor, batch_dim: int, compute_lyapunov: bool, lyap_eps: float,
                 lyap_layers: Optional[Sequence[int]], record_states: bool, lyap_options: dict):
        """``(logits, lyap_est or None, recordings or None)`` for a time-first ``x_tf``; ``x_tf``
        is what the engine extends with twins along ``batch_dim`` (a view of the user's input)."""
        if compute_lyapunov:
            # the seed API returns only the exponent: skip the spike-flip diagnostic
            res = finite_difference_lyapunov(
                self, x_tf, forward=lambda model, x: model._classify(x, record_states),
                batch_dim=batch_dim, output_batch_dim=0, eps=lyap_eps, layers=lyap_layers, count_flips=False,
                **lyap_options)
            outputs, lyap = res.outputs, res.exponent
        else:
            outputs, lyap = self._classify(x_tf, record_states), None
        return outputs[0], lyap, self.recordings(outputs[1:]) if record_states else None

    @staticmethod
    def recordings(stacked: Sequence[torch.Tensor]) -> Dict[str, object]:
        """The seeds' recordings from per-layer spikes then membranes, each ``(B, T, ...)``:
        ``spikes`` / ``membrane`` of the last layer (as seed 001), ``layer_spikes`` /
        ``layer_membranes`` one tensor per layer."""
        half = len(stacked) // 2
        spikes, mems = list(stacked[:half]), list(stacked[half:])
        return {"spikes": spikes[-1], "membrane": mems[-1], "layer_spikes": spikes,
                "layer_membranes": mems}


def zeros_state(shapes: Sequence[Tuple[int, ...]], batch_size: int, device, dtype):
    """A tuple of zero tensors ``(batch_size, *shape)``, one per shape."""
    return tuple(torch.zeros(batch_size, *s, device=device, dtype=dtype) for s in shapes)


class SequenceModel(SeedModel):
    """A seed model over sequences ``(B, T, D)``: Linear layers into spiking layers, time-summed
    last-layer spikes -> ``readout``. Subclasses add the neurons and the stepper protocol.
    """

    def __init__(self, input_dim: int, hidden_dims, num_classes: int):
        super().__init__()
        self.hidden_dims = check_dims(hidden_dims)
        self.input_dim = check_int(input_dim, "input_dim")
        self.num_classes = check_int(num_classes, "num_classes")
        self.num_layers = len(self.hidden_dims)
        dims = [self.input_dim] + self.hidden_dims
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(self.num_layers))
        self.readout = nn.Linear(self.hidden_dims[-1], self.num_classes)

    def _init_weights(self) -> None:
        """Seed 001: Xavier-uniform weights and zero biases for the layers and the readout."""
        for lin in list(self.linears) + [self.readout]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, compute_lyapunov: bool = False, lyap_eps: float = 1e-4,
                lyap_layers: Optional[Sequence[int]] = None, record_states: bool = False, *,
                time_first: bool = False, lyap_renorm: str = "global", lyap_fraction: float = 1.0,
                lyap_dtype: Optional[torch.dtype] = None, lyap_renorm_every: int = 1):
        """Classify a sequence.

        Args:
            x: ``(B, T, D)`` batch-first as seed 001, or ``(T, B, D)`` with ``time_first=True``.
            compute_lyapunov, lyap_eps, lyap_layers: the seed's finite-difference estimate
                (see :func:`stablespike.lyapunov.finite_difference_lyapunov`, which also documents
                ``lyap_renorm`` (``renorm``), ``lyap_fraction``, ``lyap_dtype`` (``twin_dtype``) and
                ``lyap_renorm_every``).
            record_states: also return spikes and membranes.

        Returns:
            ``(logits (B, C), lyap_est scalar or None, recordings dict or None)``; recordings hold
            ``spikes`` and ``membrane`` of the last layer ``(B, T, H)`` and per-layer lists.
        """
        layout = "(T, B, D)" if time_first else "(B, T, D)"
        check_tensor(x, "x", ndims=(3,), layout=layout, floating=True)
        check_size(x, "x", 2, self.input_dim, "input_dim", layout)
        x_tf = x if time_first else batch_first_to_time_first(x)
        return self._forward(
            x_tf, 1, compute_lyapunov, lyap_eps, lyap_layers, record_states,
            {"renorm": lyap_renorm, "fraction": lyap_fraction, "twin_dtype": lyap_dtype,
             "renorm_every": lyap_renorm_every})

    def _logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.readout(outputs.sum(dim=0))
