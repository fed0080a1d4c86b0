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

from .neuron_runs import Neuron, NeuronRun, cast_floats, split_like
from .neurons import Layer
from .sharing import shared_across_twins
from .twins import TwinEstimate


class ModuleTwins(NeuronRun):
    """Runs ``forward(model, x)`` with twins (``x`` already extended by ``estimate.rows``)."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], chosen: Sequence[int],
                 estimate: TwinEstimate, generator: Optional[torch.Generator],
                 dtype: Optional[torch.dtype] = None):
        rows = estimate.rows
        super().__init__(model, layers, chosen, rows.total, rows.batch, estimate.renorm == "global")
        self.estimate, self.generator, self.twin_rows = estimate, generator, rows
        # floating outputs of the neurons are cast to it: snnTorch's spike functions return
        # float32 whatever the membrane's dtype, which a float64 run must not see
        self.dtype = dtype

    def run(self, forward, x):
        with shared_across_twins(self.model, self.twin_rows):
            return super().run(forward, x)

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
        new = self._differences(step, neurons)
        for n in neurons:
            for s, d in zip(n.state.values(), new[n.group]):
                n.required[id(s)] = self.twin_rows.with_difference(s, d)

    def _differences(self, step: int, neurons: List[Neuron]):
        """``{group: [new twin differences (K, ...)]}`` after ``step``: the perturbation (-1),
        or the measured differences scaled back (jointly, or each layer to its share)."""
        rows, est = self.twin_rows, self.estimate
        if step == -1:
            shapes = [(rows.twins,) + tuple(s.shape[1:]) for n in neurons for s in n.state.values()]
            like = next(iter(neurons[0].state.values()))
            new = split_like(est.perturbation(shapes, like, self.generator), neurons)
        else:
            diffs = {n.group: [rows.difference(s) for s in n.state.values()] for n in neurons}
            if est.renorm == "global":  # one group in the estimate
                flat = est.renormalize(step, {0: [d for n in neurons for d in diffs[n.group]]})[0]
                new = split_like(flat, neurons)
            else:
                new = est.renormalize(step, diffs)
        return new

    def finish(self) -> None:
        """Measure the interval still open at the end (no renormalization follows it)."""
        for group in self.open_intervals():
            self._differences(group[0].calls - 2, group)
