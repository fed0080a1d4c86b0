"""stablespike's diagnostics inside a PyTorch Lightning run, as a Lightning ``Callback``.

    from stablespike.integrations.lightning import StableSpikeCallback
    trainer = lightning.Trainer(callbacks=[StableSpikeCallback(every=50)])

The profiler is attached to the LightningModule for the whole fit (every spiking neuron the
adapters find: snnTorch, spikingjelly, norse, registered types). After every ``every``-th training
batch (its gradients still in place) a row of :class:`stablespike.DiagnosticsCallback` is made
and sent to the trainer's loggers (TensorBoard, CSV, W&B, ...): ``diagnostics/<figure>`` and per
layer ``firing_rate/<layer>`` and ``grad_norm/<layer>``. A ``training_step`` that returns a dict
with ``"lyapunov"`` (e.g. ``finite_difference_lyapunov(...).exponent``) has it logged too.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import lightning.pytorch as pl

from ..callbacks import DiagnosticsCallback


class StableSpikeCallback(pl.Callback):
    """Runs :class:`stablespike.DiagnosticsCallback` in a Lightning fit; ``history`` holds its rows."""

    def __init__(self, every: int = 50, compute_sv: bool = False):
        self.diagnostics = DiagnosticsCallback(every=every, compute_sv=compute_sv, sink=self._log)
        self._trainer: Optional[pl.Trainer] = None

    @property
    def history(self) -> List[Dict]:
        return self.diagnostics.history

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self.diagnostics.on_train_begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        lyapunov = outputs.get("lyapunov") if isinstance(outputs, dict) else None
        self.diagnostics.on_batch_end(trainer.global_step - 1, pl_module, loss, lyapunov)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnostics.on_train_end()

    def _log(self, row: Dict) -> None:
        """Numbers of ``row`` to every logger of the trainer, at the trainer's step."""
        flat = {f"diagnostics/{k}": float(v) for k, v in row.items()
                if k not in ("step", "global_step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for layer, figures in row.get("layers", {}).items():
            flat.update({f"{name}/{layer}": float(v) for name, v in figures.items() if isinstance(v, (int, float)) and v == v})
        for logger in self._trainer.loggers if self._trainer is not None else []:
            logger.log_metrics(flat, step=row["step"])
