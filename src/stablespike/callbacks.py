"""Training callbacks: run the profiler and the stability monitor every ``every`` steps.

The training loop (``stablespike.train``) calls ``on_train_begin(model)``, ``on_batch_end(step,
model, loss, lyapunov)`` after ``loss.backward()``, and ``on_train_end()``; any loop can do the same.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import numpy as np
from torch import nn

from .distributed import current
from .profiler import LayerStats, SpikeProfiler
from .stability import StabilityMonitor

log = logging.getLogger(__name__)


RATE_BINS = 20  # histogram bins of the per-neuron firing rates over [0, 1]


def layer_row(ls: LayerStats) -> Dict:
    """One layer's figures in a row: mean ``firing_rate``, ``dead_fraction`` (neurons below the
    profiler's dead rate, ``Thresholds.dead_rate``), mean ``grad_norm`` and ``rate_histogram``, the
    counts of neurons whose firing rate falls in each of ``RATE_BINS`` equal bins ``[j/20, (j+1)/20)``
    of [0, 1] (a rate of exactly 1 counts in the last bin)."""
    # a rate k/n on an edge j/20 belongs to bin j: the tolerance absorbs k/n's rounding below j/20
    bins = np.floor(np.clip(ls.firing_rates, 0.0, 1.0) * RATE_BINS + 1e-9).astype(np.int64)
    counts = np.bincount(np.minimum(bins, RATE_BINS - 1), minlength=RATE_BINS)
    return {"firing_rate": float(ls.firing_rates.mean()), "dead_fraction": float(ls.dead_neuron_fraction),
            "grad_norm": ls.grad_norm_mean, "rate_histogram": [int(c) for c in counts]}


class DiagnosticsCallback:
    """Attaches a :class:`SpikeProfiler` for the whole run and, every ``every`` steps, computes
    :class:`StabilityMetrics` and logs them with the profiler's health score and findings.

    ``history`` keeps one dict per logged step (bounded by ``max_history``); ``sink``, if given,
    receives each dict too (e.g. a JSON-lines writer). Under torchrun every rank must run the
    callback (the profiler's report is merged across ranks); only rank 0 logs and calls ``sink``.
    """

    def __init__(self, every: int = 50, compute_sv: bool = False, max_history: int = 10_000,
                 sink: Optional[Callable[[Dict], None]] = None, profiler: Optional[SpikeProfiler] = None,
                 stability: Optional[StabilityMonitor] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an integer >= 1, got {every!r}")
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history: expected an integer >= 1, got {max_history!r}")
        if not isinstance(compute_sv, bool):
            raise TypeError(f"compute_sv: expected True or False, got {compute_sv!r}")
        if sink is not None and not callable(sink):
            raise TypeError(f"sink: expected a function of one dict, or None, got {sink!r}")
        if profiler is not None and not isinstance(profiler, SpikeProfiler):
            raise TypeError(f"profiler: expected a SpikeProfiler or None, got {type(profiler).__name__}")
        if stability is not None and not isinstance(stability, StabilityMonitor):
            raise TypeError(f"stability: expected a StabilityMonitor or None, got {type(stability).__name__}")
        self.every, self.compute_sv, self.sink = int(every), compute_sv, sink
        self.profiler = profiler or SpikeProfiler()
        self.stability = stability or StabilityMonitor()
        self.max_history = max_history
        self.history: List[Dict] = []
        self.calls = 0  # on_batch_end calls over the whole run: the global step

    def on_train_begin(self, model: nn.Module) -> None:
        self.profiler.attach(model)

    def on_batch_end(self, step: int, model: nn.Module, loss=None, lyapunov=None) -> Optional[Dict]:
        """At each ``step`` divisible by ``every`` a row: the stability metrics, the health score
        and findings, and per layer (``layers``) the mean firing rate and the mean layer gradient
        norm of the steps since the last row; ``global_step`` counts the calls over the whole run
        (``step`` may restart each epoch)."""
        self.calls += 1
        if step % self.every:
            return None
        metrics = self.stability.compute(model, lyapunov=lyapunov, compute_sv=self.compute_sv)
        report = self.profiler.report()
        row = {"step": step, "global_step": self.calls - 1, **metrics.to_dict(),
               "health_score": report.health_score,
               "findings": [f"{p.severity.value} {p.category} @ {p.layer}" for p in report.pathologies],
               "layers": {ls.name: layer_row(ls) for ls in report.layer_stats.values()}}
        if loss is not None:
            row["loss"] = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        self.history = (self.history + [row])[-self.max_history:]
        if not current().is_main:  # under torchrun the report is merged over ranks; rank 0 writes it
            self.profiler.reset()
            return row
        if self.sink is not None:
            self.sink(row)
        log.info("step %d: %s | health %.0f | %d finding(s)", step, metrics, report.health_score,
                 len(report.pathologies))
        self.profiler.reset()  # each logged window reports on its own steps
        return row

    def on_train_end(self) -> None:
        self.profiler.detach()

    def on_eval_begin(self) -> None:
        """``fit`` evaluates: the rows describe training batches, so the hooks stop counting."""
        self.profiler.pause()

    def on_eval_end(self) -> None:
        self.profiler.resume()

    def on_exception(self, err: BaseException) -> None:
        """``fit`` raised (or was interrupted): no hooks are left on the model."""
        self.profiler.detach()


class TensorBoardSink:
    """A ``sink`` for :class:`DiagnosticsCallback` that writes each row to TensorBoard at its
    ``global_step``: every number of the row (``health_score``, ``grad_norm``, ``lyapunov``, ``loss``,
    ...) under ``diagnostics/``; per layer the scalars ``firing_rate/<layer>``, ``dead_fraction/<layer>``
    and ``grad_norm/<layer>`` and the histogram ``rate_histogram/<layer>`` of its neurons' firing rates.

    ``log_dir``: a directory for a new ``SummaryWriter``, or ``writer``: one you have.
    """

    def __init__(self, log_dir: Optional[str] = None, writer=None):
        if (log_dir is None) == (writer is None):
            raise ValueError(f"log_dir, writer: expected exactly one of them, got log_dir={log_dir!r}, "
                             f"writer={writer!r}")
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            writer = SummaryWriter(log_dir)
        self.writer = writer

    def __call__(self, row: Dict) -> None:
        step = row["global_step"]
        for tag, value in row_scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        for layer, figures in row.get("layers", {}).items():
            if figures.get("rate_histogram"):
                write_rate_histogram(self.writer, f"rate_histogram/{layer}", figures["rate_histogram"], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def row_scalars(row: Dict) -> Dict[str, float]:
    """The numbers of a row by tag: ``diagnostics/<name>`` for the row's own, ``<figure>/<layer>``
    per layer (``firing_rate``, ``dead_fraction``, ``grad_norm``); a figure not measured in the
    window (None, NaN) is left out."""
    tags = {f"diagnostics/{k}": float(v) for k, v in row.items()
            if k not in ("step", "global_step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for layer, figures in row.get("layers", {}).items():
        tags.update({f"{name}/{layer}": float(v) for name, v in figures.items()
                     if isinstance(v, (int, float)) and v == v})
    return tags


def write_rate_histogram(writer, tag: str, counts: List[int], step: int) -> None:
    """``counts`` (``RATE_BINS`` neuron counts over equal bins of [0, 1]) as a TensorBoard histogram;
    each neuron is placed at its bin's centre for the min, max and moments TensorBoard shows."""
    edges = np.linspace(0.0, 1.0, len(counts) + 1)
    centres, n = (edges[:-1] + edges[1:]) / 2, np.asarray(counts, dtype=np.float64)
    if n.sum() == 0:
        return
    filled = np.nonzero(n)[0]
    writer.add_histogram_raw(tag, min=float(centres[filled[0]]), max=float(centres[filled[-1]]),
                             num=int(n.sum()), sum=float((n * centres).sum()),
                             sum_squares=float((n * centres ** 2).sum()), bucket_limits=edges[1:].tolist(),
                             bucket_counts=n.tolist(), global_step=step)
