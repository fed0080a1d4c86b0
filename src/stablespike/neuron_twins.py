"""The twin engine's module driver: Lyapunov twins inside any model with spiking neurons.

The model runs through the user's own ``forward(model, x)`` on its batch extended with twin rows
(:class:`~stablespike.twins.TwinRows`); batch norm and dropout treat twins as their samples
(:mod:`stablespike.sharing`). After the first call of every neuron its twins' state is displaced
by a random direction of norm ``eps``; after every interval the twins' distance is measured and
scaled back (:class:`~stablespike.twins.TwinEstimate`). How the state is read and replaced, and
how multi-step neurons are stepped, is :mod:`stablespike.neuron_runs`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .neuron_runs import Neuron, NeuronRun, cast_floats, kept_state, map_tensors
from .neurons import Layer
from .sharing import shared_across_twins
from .twins import TwinEstimate


class ModuleTwins(NeuronRun):
    """Runs ``forward(model, x)`` with twins (``x`` already extended by ``estimate.rows``)."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], chosen: Sequence[int],
                 estimate: TwinEstimate, generator: Optional[torch.Generator],
                 dtype: Optional[torch.dtype] = None, at_neurons: bool = True,
                 model_dtype: Optional[torch.dtype] = None):
        rows = estimate.rows
        # at_neurons: the twin rows are appended at the neurons' inputs; else x comes extended
        self.appends_rows = at_neurons
        super().__init__(model, layers, chosen, rows.total, rows.batch, estimate.renorm == "global")
        self.estimate, self.generator, self.twin_rows = estimate, generator, rows
        # floating outputs of the neurons are cast to it: snnTorch's spike functions return
        # float32 whatever the membrane's dtype, which a float64 run must not see
        self.dtype = dtype
        # the state the neurons keep goes back to the model's precision, as a plain call leaves it
        self.kept_dtype = model_dtype if dtype is not None else None

    @property
    def rows_added(self) -> str:
        if not self.appends_rows:
            return "along batch_dim"
        return ("at its spiking neurons' inputs (a layer that mixes a neuron's output with a "
                "tensor computed before the first neuron, such as a skip connection from x or a "
                "reshape to x's batch size, cannot take them)")

    def run(self, forward, x):
        """``forward(model, x)``. With ``at_neurons``, ``x`` holds the samples and the twin rows
        are appended where a neuron gets a tensor of the samples' rows (its input, a state the
        user made), so the layers before the first neuron run once, as the seeds' loops did;
        otherwise ``x`` comes with the twin rows."""
        # until a neuron runs, tensors hold the samples only
        self.twin_rows.started = not self.appends_rows
        with shared_across_twins(self.model, self.twin_rows, any(n.multistep for n in self.neurons)):
            return super().run(forward, x)

    def extend(self, t, dim):
        return self.twin_rows.extend(t, dim)

    def carried(self, t):
        return self.twin_rows.extend(t, 0)

    def entering(self) -> None:
        self.twin_rows.started = True

    def cast_in(self, obj):
        if self.dtype is None or obj is None:
            return obj
        return map_tensors(obj, self._in_run_dtype)

    def cast_kept(self, module: nn.Module) -> None:
        # what the neuron keeps in another precision: snnTorch's float32 spikes (its spike
        # functions return float32 whatever the membrane's dtype), which RLeaky feeds back into
        # its recurrent layer, and states the forward made before the run (init_rleaky())
        if self.dtype is not None:
            for container, key, value in kept_state(module):
                if value.is_floating_point() and value.dtype != self.dtype:
                    container[key] = value.to(self.dtype)

    def _in_run_dtype(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def wrap_output(self, output):
        return output if self.dtype is None else cast_floats(output, self.dtype)

    def due(self, step: int) -> bool:
        return self.estimate.is_boundary(step)

    def observe(self, n: Neuron, step: int) -> None:
        if step >= 0 and self.estimate.count_flips and n.spikes is not None \
                and n.spikes.shape[:1] == (self.rows,):
            with torch.no_grad():
                self.estimate.record_flips(step, self.twin_rows.difference(n.spikes).ne(0).flatten(1).any(1))

    def replacements(self, step: int, neurons: List[Neuron]) -> None:
        for n, old, new in zip(*self._renormalized(step, neurons)):
            n.required[id(old)] = new

    def _renormalized(self, step: int, neurons: List[Neuron]):
        """``(owners, old states, new states)`` after ``step``: the perturbation (-1), or the
        twins put back at distance eps (all layers jointly, or each to its share)."""
        owners = [n for n in neurons for _ in n.state]
        old = [s for n in neurons for s in n.state.values()]
        rows, est = self.twin_rows, self.estimate
        if step == -1:
            shapes = [(rows.twins,) + tuple(s.shape[1:]) for s in old]
            new = [rows.with_difference(s, d)
                   for s, d in zip(old, est.perturbation(shapes, old[0], self.generator))]
        else:
            new = est.renormalize(step, old, [n.group for n in owners])
        return owners, old, new

    def finish(self) -> None:
        """Measure the interval still open at the end (no renormalization follows it)."""
        for group in self.open_intervals():
            self._renormalized(group[0].calls - 2, group)
