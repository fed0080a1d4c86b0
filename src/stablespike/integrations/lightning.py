"""stablespike's diagnostics inside a PyTorch Lightning fit, as a Lightning ``Callback``.

    from stablespike.integrations.lightning import DiagnosticsCallback
    trainer = lightning.Trainer(callbacks=[DiagnosticsCallback(every=50)], logger=...)

Needs the ``lightning`` package (``pip install stablespike[lightning]``); ``import stablespike``
does not import it. What it does during ``trainer.fit``:

* attaches a :class:`~stablespike.SpikeProfiler` to the LightningModule (or to its attribute
  ``module``) at fit start and detaches it at fit end; every spiking neuron the adapters find is
  recorded (snnTorch, spikingjelly, norse, registered types);
* records the training batches only: recording is paused outside them (sanity check,
  validation), so the figures describe what the optimizer sees;
* every ``every``-th optimizer step, in ``on_before_optimizer_step`` (where Lightning documents the
  gradients as unscaled), makes a row over the batches since the previous row and logs it through
  every logger of the trainer at ``trainer.global_step``: per neuron layer ``firing_rate/<layer>``,
  ``dead_fraction/<layer>`` (neurons firing below the profiler's dead rate, 0.01 by default),
  ``grad_norm/<layer>`` (the gradient reaching the layer's input current, divided by the AMP loss
  scale when there is one), and
  ``diagnostics/health_score``, ``diagnostics/grad_norm`` (all parameters),
  ``diagnostics/mean_firing_rate``, ``diagnostics/findings`` (their number), ``diagnostics/loss``;
  a TensorBoard logger also gets the histogram ``rate_histogram/<layer>`` of the layer's
  per-neuron firing rates;
* at each training epoch's end logs ``diagnostics/epoch_health_score`` and
  ``diagnostics/epoch_findings`` over the whole epoch, logs each finding (Python ``logging``,
  logger ``stablespike.integrations.lightning``) and writes the profiler's report as
  ``diagnostics_epoch<N>.json`` and ``diagnostics_epoch<N>.html`` into ``trainer.log_dir``
  (``trainer.default_root_dir`` without a logger); the epoch's report stays in ``epoch_report``;
* with ``lyapunov_every=k``, every k-th optimizer step estimates the network's finite-size
  Lyapunov exponent on the step's batch (:func:`stablespike.finite_difference_lyapunov` through
  ``forward``) and logs ``diagnostics/lyapunov``. The estimate runs without gradients, with the
  profiler paused, the global random generator and every buffer (batch-norm running statistics,
  neuron state) restored afterwards: training continues as if it had not run.

The hooks are removed at fit end, and also when the fit raises (``on_exception``).

Under DDP every figure is merged over all ranks (the profiler's records and the exponent), every
rank takes part in the merge, and only rank 0 logs and writes files.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable, Dict, List, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from ..callbacks import layer_row, row_scalars, write_rate_histogram
from ..distributed import current, mean_across_ranks
from ..lyapunov import finite_difference_lyapunov
from ..lyapunov.finite_difference import RunState
from ..neurons import find_layers
from ..profiler import ProfileReport, SpikeProfiler
from ..stability import gradient_norm

log = logging.getLogger(__name__)


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


class DiagnosticsCallback(pl.Callback):
    """Per-layer firing rates, dead fractions, gradient norms, the health score, the verdict and
    report files of a Lightning fit; see the module docstring.

    ``every``: optimizer steps per logged row. ``module``: the name of the LightningModule's
    attribute holding the network (default: the whole LightningModule). ``lyapunov_every``:
    optimizer steps per Lyapunov estimate (None: no estimate). ``forward(net, x)``: how the
    network runs on the input ``x`` of a batch (the first element of a tuple/list batch; default
    ``net(x)``), with ``batch_dim`` the dimension of ``x`` that indexes samples and ``lyap_eps`` the
    perturbation size. ``profiler``: a configured :class:`SpikeProfiler` (e.g. other thresholds).
    ``history`` keeps every row (dicts as :class:`stablespike.DiagnosticsCallback` makes them);
    ``epoch_report`` is the last training epoch's :class:`~stablespike.ProfileReport` (merged over
    the ranks), None before the first epoch ends.
    """

    def __init__(self, every: int = 50, module: Optional[str] = None, lyapunov_every: Optional[int] = None,
                 forward: Optional[Callable] = None, batch_dim: int = 0, lyap_eps: float = 1e-2,
                 profiler: Optional[SpikeProfiler] = None):
        self.every = _positive_int(every, "every")
        self.lyapunov_every = _positive_int(lyapunov_every, "lyapunov_every", allow_none=True)
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module: expected the name of an attribute of the LightningModule, got {module!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward: expected a function (net, x) -> outputs or None, got {forward!r}")
        if profiler is not None and not isinstance(profiler, SpikeProfiler):
            raise TypeError(f"profiler: expected a SpikeProfiler or None, got {type(profiler).__name__}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise ValueError(f"batch_dim: expected the integer dimension of x that indexes samples, "
                             f"got {batch_dim!r}")
        if (isinstance(lyap_eps, bool) or not isinstance(lyap_eps, (int, float))
                or not math.isfinite(lyap_eps) or lyap_eps <= 0):
            raise ValueError(f"lyap_eps: expected a finite perturbation size > 0, got {lyap_eps!r}")
        self.module, self.forward, self.batch_dim, self.lyap_eps = module, forward, batch_dim, lyap_eps
        self.recorder = profiler or SpikeProfiler()  # the hooks; drained into the two below
        self.since_row = SpikeProfiler(self.recorder.thresholds)  # the batches of the next row
        self.this_epoch = SpikeProfiler(self.recorder.thresholds)  # the batches of this epoch
        self.history: List[Dict] = []
        self.epoch_report: Optional[ProfileReport] = None
        self._net: Optional[nn.Module] = None
        self._loss: Optional[float] = None
        self._lyapunov_step = -1  # the last estimated interval of lyapunov_every optimizer steps

    # --- recording only the training batches ------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        net = pl_module if self.module is None else getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"module: expected the name of an nn.Module attribute of "
                             f"{type(pl_module).__name__}, got {self.module!r}")
        self._net, self._lyapunov_step, self.epoch_report = net, -1, None
        for profiler in (self.recorder, self.since_row, self.this_epoch):  # a callback used again
            profiler.reset()
        self.recorder.attach(net)
        self.recorder.pause()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recorder.resume()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.recorder.pause()
        step = trainer.global_step - 1  # the optimizer step this batch ended with
        # once per lyapunov_every optimizer steps: also when gradients accumulate (no step for a
        # few batches) or several optimizers step per batch (global_step moves by more than 1)
        if self.lyapunov_every and step >= 0 and step // self.lyapunov_every != self._lyapunov_step:
            self._lyapunov_step = step // self.lyapunov_every
            self._log(trainer, {"diagnostics/lyapunov": self._lyapunov(batch)}, step)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._loss = float(loss.detach())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.recorder.detach()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.recorder.detach()  # a fit that raised (or was interrupted) leaves no hooks behind

    # --- rows -----------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        self._drain()
        report = self.since_row.report()  # merged over the ranks: a collective
        self.since_row.reset()
        scale = _loss_scale(trainer)
        stats = list(report.layer_stats.values())
        neurons = sum(ls.n_neurons for ls in stats)
        row = {"step": step, "global_step": step, "grad_norm": gradient_norm(self._net),  # unscaled here
               "mean_firing_rate": sum(float(ls.firing_rates.sum()) for ls in stats) / neurons if neurons else None,
               "health_score": report.health_score,
               "findings": len(report.pathologies), "loss": self._loss,
               "layers": {ls.name: layer_row(ls) for ls in report.layer_stats.values()}}
        for figures in row["layers"].values():
            figures["grad_norm"] = figures["grad_norm"] / scale
        self.history.append(row)
        self._log(trainer, row_scalars(row), step, histograms=row["layers"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain()
        report = self.this_epoch.report()  # a collective
        self.this_epoch.reset()
        self.epoch_report = report
        self._log(trainer, {"diagnostics/epoch_health_score": report.health_score,
                            "diagnostics/epoch_findings": float(len(report.pathologies))}, trainer.global_step)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank asks
        if not current().is_main:
            return
        epoch = trainer.current_epoch
        log.info("epoch %d: health %.0f/100, %d finding(s)", epoch, report.health_score, len(report.pathologies))
        for p in report.pathologies:
            log.info("  [%s] %s @ %s: %s; fix: %s", p.severity.value, p.category, p.layer, p.message, p.suggestion)
        os.makedirs(log_dir, exist_ok=True)
        report.to_json(os.path.join(log_dir, f"diagnostics_epoch{epoch}.json"))
        report.to_html(os.path.join(log_dir, f"diagnostics_epoch{epoch}.html"))

    # --- helpers ----------------------------------------------------------------------------------
    def _drain(self) -> None:
        """What the hooks recorded since the last drain, to the next row and to this epoch."""
        self.since_row.absorb(self.recorder)
        self.this_epoch.absorb(self.recorder)
        self.recorder.reset()

    def _lyapunov(self, batch) -> float:
        """The finite-size exponent of the network on ``batch``'s input, merged over the ranks;
        the random generators, every buffer and the state the neurons keep (snnTorch's ``mem``,
        spikingjelly's ``v``) are left as training had them."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        net = self._net
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"batch: expected a tensor or a tuple/list whose first entry is the "
                             f"input tensor, got {type(x).__name__}")
        saved = RunState(net, find_layers(net), x, None)
        try:
            with torch.no_grad():
                res = finite_difference_lyapunov(net, x, forward=self.forward, batch_dim=self.batch_dim,
                                                 eps=self.lyap_eps)
        finally:
            saved.restore()
        return float(mean_across_ranks(res.exponent.detach().reshape(())))

    def _log(self, trainer, metrics: Dict[str, float], step: int, histograms: Optional[Dict] = None) -> None:
        if not current().is_main:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if histograms and isinstance(logger, pl.loggers.TensorBoardLogger):
                for layer, figures in histograms.items():  # rows of layer_row: always there
                    write_rate_histogram(logger.experiment, f"rate_histogram/{layer}", figures["rate_histogram"], step)


def _loss_scale(trainer) -> float:
    """The AMP loss scale the layer gradients were recorded at (1 without a grad scaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
