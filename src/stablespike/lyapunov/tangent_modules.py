"""The tangent spectrum of any module with spiking neurons (the module driver of
:func:`~stablespike.lyapunov.tangent_spectrum`).

The model runs through its own forward on ``k`` copies of the batch, inside a forward-mode AD
level, with each neuron's own surrogate given a forward-mode derivative
(:mod:`stablespike.forward_mode`). After each neuron's first call its continuous state gets the
``k`` tangent columns of a random orthonormal basis (one per copy); every ``t_ons`` steps the
tangents of all layers are re-orthonormalized together by QR and ``log |diag R|`` accumulated.
Spikes fed back into a neuron (recurrent layers) carry tangents too; they follow the same change
of basis. Multi-step neurons (a whole sequence per call) run one step at a time and each layer
is orthonormalized on its own with the tangent of its input removed: the spectrum of its
diagonal block; for such layer-after-layer (block-triangular) dynamics the spectrum is the union
of the blocks' spectra, and the top ``k`` of that union is reported.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.autograd.forward_ad as fwAD

from ..degenerate import FlooredLog
from ..forward_mode import forward_mode_surrogates
from ..neuron_runs import Neuron, NeuronRun
from ..neurons import find_layers
from ..sharing import shared_across_twins
from ..twins import TwinRows


def _primal_tangent(s: torch.Tensor):
    primal, tangent = fwAD.unpack_dual(s)
    return primal, (torch.zeros_like(primal) if tangent is None else tangent)


def _qr(y: torch.Tensor):
    """``torch.linalg.qr`` in float32 at least (it has no half-precision kernels; under
    autocast it came back in float32 beside a bfloat16 state) and with autocast off."""
    with torch.autocast(y.device.type, enabled=False):
        return torch.linalg.qr(y.to(torch.promote_types(y.dtype, torch.float32)))


class ModuleTangents(NeuronRun):
    """Pushes ``k`` tangents per sample through ``forward(model, x)``; see the module docstring."""

    def __init__(self, model, layers, batch: int, k: int, t_ons: int, discard: int, generator):
        copies = TwinRows(batch, torch.arange(batch).repeat(k - 1))
        super().__init__(model, layers, list(range(len(layers))), copies.total, batch, joint=True)
        self.copies, self.B, self.k, self.t_ons, self.discard = copies, batch, k, t_ons, discard
        self.generator = generator
        self.log_sum: Dict[int, torch.Tensor] = {}  # group -> (B, k)
        self.counted: Dict[int, int] = {}
        self.start: Dict[int, int] = {}  # group -> first step of the open interval
        self.history: Dict[int, List[torch.Tensor]] = {}
        self.log = FlooredLog()

    def due(self, step: int) -> bool:
        return (step + 1) % self.t_ons == 0

    def carried(self, t: torch.Tensor) -> torch.Tensor:
        return self.copies.extend(t, 0)

    def step_input(self, n: Neuron, x_t: torch.Tensor) -> torch.Tensor:
        return fwAD.unpack_dual(x_t).primal  # a layer on its own: its diagonal block only

    def replacements(self, step: int, neurons: List[Neuron]) -> None:
        key = 0 if self.joint else neurons[0].group
        owned = [(n, s) for n in neurons for s in n.state.values()]
        primals, tangents = zip(*(_primal_tangent(s) for _, s in owned))
        if step == -1:
            n_dims = sum(p[0].numel() for p in primals)
            if self.k > n_dims:
                raise ValueError(f"k: expected at most the continuous state dimension {n_dims}"
                                 f"{'' if self.joint else ' of every layer'}, got {self.k}")
            g = torch.randn(self.B, n_dims, self.k, generator=self.generator, dtype=torch.float64)
            q = _qr(g.to(primals[0].device, primals[0].dtype))[0]
            self.start[key] = 0
        else:
            y = torch.cat([t.reshape(self.k, self.B, -1) for t in tangents], dim=2).permute(1, 2, 0)
            q, r = _qr(y)  # y: (B, n, k)
            self._count(key, step, torch.diagonal(r, dim1=-2, dim2=-1))
            self._spikes_follow(neurons, r)
        for (owner, s), p, t in zip(owned, primals, self._columns_to_rows(q, primals)):
            owner.required[id(s)] = fwAD.make_dual(p, t)

    def _count(self, key: int, step: int, diag: torch.Tensor) -> None:
        if self.start[key] >= self.discard:
            growth = self.log(diag.abs())
            self.log_sum[key] = self.log_sum[key] + growth if key in self.log_sum else growth
            self.counted[key] = self.counted.get(key, 0) + step + 1 - self.start[key]
            self.history.setdefault(key, []).append((self.log_sum[key] / self.counted[key]).mean(0).detach())
        self.start[key] = step + 1

    def _spikes_follow(self, neurons: List[Neuron], r: torch.Tensor) -> None:
        """Spikes a recurrent neuron gets back: their tangents in the new basis, ``x R^-1``."""
        for n in neurons:
            if n.spikes is None or fwAD.unpack_dual(n.spikes).tangent is None:
                continue
            p, t = _primal_tangent(n.spikes)
            cols = t.reshape(self.k, self.B, -1).permute(1, 2, 0)  # (B, m, k)
            solved = torch.linalg.solve_triangular(r, cols.to(r.dtype), upper=True, left=False)
            n.optional[id(n.spikes)] = fwAD.make_dual(p, solved.permute(2, 0, 1).reshape(p.shape).to(p.dtype))

    def _columns_to_rows(self, q: torch.Tensor, primals) -> List[torch.Tensor]:
        """``(B, n, k)`` -> per state tensor a ``(k * B, ...)`` tangent (copy j = column j)."""
        out, offset = [], 0
        for p in primals:
            size = p[0].numel()
            block = q[:, offset: offset + size, :]
            out.append(block.permute(2, 0, 1).reshape(p.shape).to(p.dtype))
            offset += size
        return out

    def finish(self) -> None:
        for group in self.open_intervals():
            key = 0 if self.joint else group[0].group
            states = [s for n in group for s in n.state.values()]
            y = torch.cat([_primal_tangent(s)[1].reshape(self.k, self.B, -1) for s in states], 2)
            r = _qr(y.permute(1, 2, 0))[1]
            self._count(key, group[0].calls - 2, torch.diagonal(r, dim1=-2, dim2=-1))

    def result(self):
        """``(exponents (k,), per_sample (B, k), steps, history (n, k), log)``, largest first;
        ``log`` tells whether a growth factor hit the dtype's floor."""
        if not self.log_sum:
            raise ValueError("discard: no orthonormalization was counted; lower discard or t_ons")
        keys = sorted(self.log_sum)
        per_sample = torch.cat([self.log_sum[g] / self.counted[g] for g in keys], dim=1)
        order = per_sample.detach().mean(0).argsort(descending=True)[: self.k]
        steps = self.counted[keys[0]]
        rounds = min(len(self.history[g]) for g in keys)
        history = torch.stack([torch.cat([self.history[g][i] for g in keys]).sort(descending=True)
                               .values[: self.k] for i in range(rounds)])
        return per_sample.mean(0)[order], per_sample[:, order], steps, history, self.log


def module_tangents(model, x: torch.Tensor, forward, batch_dim: int, k: int, t_ons: int,
                    discard: int, generator: Optional[torch.Generator]):
    """Run :class:`ModuleTangents`; returns what :meth:`ModuleTangents.result` does."""
    layers = find_layers(model)
    run = ModuleTangents(model, layers, x.shape[batch_dim], k, t_ons, discard, generator)
    time_first = any(layer.adapter.multistep(layer.module, None) for layer in layers)
    with fwAD.dual_level(), forward_mode_surrogates(layers), shared_across_twins(model, run.copies, time_first):
        run.run(forward, run.copies.extend(x, dim=batch_dim))
    return run.result()
