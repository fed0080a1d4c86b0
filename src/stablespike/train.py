"""Training with the Lyapunov regularizer: TrainConfig, fit, evaluate, checkpoints and resume.

``fit(model, dataset, config, out_dir)`` trains with AdamW and a cosine schedule (seed 002's
defaults), adds ``lambda_reg * penalty(lambda)`` when ``config.lyapunov``, measures gradient norms
(and gradient singular values every ``sv_every`` batches), evaluates every epoch, and with an
``out_dir`` writes a checkpoint after every epoch (``checkpoint.pt``, loaded with
``weights_only=True``), then that epoch's JSON line (``metrics.jsonl``), so that an interrupted
run resumes where it stopped.

Any module trains: ``fit(model, data, config, forward=..., loss=...)`` runs your own time loop
``forward(model, x)`` on each batch ``x`` as the data set holds it and your loss on what it
returns (a tensor or a tuple, e.g. snnTorch's ``(spk_rec, mem_rec)``), with the penalty (one run
of the twin engine per step gives your outputs and the exponent), checkpoints, resume, DDP and
callbacks as for the library's own models. Without them, ``model`` is one of the library's models.

TensorBoard (tensorboard installed, ``out_dir`` given; in ``out_dir/tensorboard``, one point per
epoch): the epoch's figures (``train_loss``, ``test_acc``, ``lyapunov``, ``grad_norm``, ...) and,
with ``config.diagnostics``, per neuron layer ``firing_rate/<layer>``, ``dead_fraction/<layer>``,
``grad_norm/<layer>`` and the histogram ``rate_histogram/<layer>`` of its neurons' firing rates
over the epoch's training batches (the samples' rows only: twin rows and evaluation are left out),
recorded by a :class:`~stablespike.SpikeProfiler`. Under torchrun every rank records, the figures
are merged over the ranks, rank 0 writes them.

A loss that turns NaN/inf marks the run DIVERGED; the history so far is kept.

Resumed runs equal uninterrupted ones: every random draw of a training step (encoders,
augmentation, dropout masks, the Lyapunov perturbation directions and sub-batch rows) comes from
generators seeded from ``(seed, epoch, rank, step)``, never from where the global generator
happened to be. The checkpoint is the record: on resume ``metrics.jsonl`` is rewritten from the
checkpoint's own history, so a kill at any point leaves each epoch in it once.

Run files are written without following symbolic links: each into a fresh temporary file
(created exclusively, ``O_NOFOLLOW``) renamed over its name; leftovers (``*.tmp``) of a killed
run are removed on resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from .data import ENCODERS, Dataset, augment_cifar, encode
from .distributed import (Ranks, any_rank, average_buffers, broadcast_from_main, check_batch_size,
                          current, data_parallel, mean_across_ranks, setup, sum_across_ranks)
from .callbacks import TensorBoardSink, layer_row
from .context import active_rows
from .lyapunov import PENALTY_KINDS, LyapunovRegularizer, finite_difference_lyapunov
from .profiler import SpikeProfiler
from .options import OptionError, check_device, check_integer, check_number, one_line
from .runfiles import RunFileError, append_line, remove_leftovers, write_atomic
from .stability import _condition, _gradient_spectra, _rank_tolerance, effective_condition, gradient_norm

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Seed 002's defaults: AdamW (lr 1e-3, weight decay 1e-4), cosine schedule, clipping at 10,
    lambda_reg 0.3 toward lambda_target -0.1 — except eps: 1e-2, not the seed's 1e-4, which float32 twins
    cannot resolve once spread over a layer's membranes (the estimate would be quantized noise).

    ``diagnostics``: with an ``out_dir`` and tensorboard installed, :func:`fit` attaches a
    :class:`~stablespike.SpikeProfiler` to the training batches and writes each layer's firing
    rate, dead fraction, gradient norm and firing-rate histogram to TensorBoard every epoch. Its
    hooks run at every neuron call: an epoch of digits on 2 CPU threads (a 4-layer SpikingMLP or
    snnTorch's tutorial-5 network, with or without the penalty) took 1.15-1.25 x as long
    (``benchmarks/fit_diagnostics_overhead.py``); ``False`` leaves them out (the epoch scalars are
    still written).

    Every field is checked at construction (an :class:`OptionError` naming the field, the
    expected range and the value): nothing trains on a value that would train silently wrong
    (a NaN target, a negative clip that ascends the gradient, an eps of 0)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    lyapunov: bool = False
    lambda_reg: float = 0.3
    lambda_target: float = -0.1
    lyap_eps: float = 1e-2  # seed 002: 1e-4, below what float32 twins resolve over a layer
    reg_type: str = "squared"
    lyap_threshold: float = 2.0
    warmup_epochs: int = 0
    lyap_fraction: float = 1.0
    T: int = 8
    encoder: str = "direct"
    augment: bool = False
    sv_every: int = 10
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    diagnostics: bool = True  # per-layer TensorBoard figures (a profiler on the training batches)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "T", "sv_every"):
            check_integer(getattr(self, name), name, 1)
        for name in ("warmup_epochs", "seed"):
            check_integer(getattr(self, name), name, 0)
        check_number(self.lr, "lr", 0, low_open=True)
        check_number(self.weight_decay, "weight_decay", 0)
        check_number(self.grad_clip, "grad_clip", 0, low_open=True)  # <= 0 would ascend or stall
        check_number(self.lambda_reg, "lambda_reg", 0)
        check_number(self.lambda_target, "lambda_target")
        check_number(self.lyap_threshold, "lyap_threshold")
        check_number(self.lyap_eps, "lyap_eps", 0, low_open=True)
        check_number(self.lyap_fraction, "lyap_fraction", 0, 1, low_open=True)
        for name in ("lyapunov", "augment", "progress", "diagnostics"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise OptionError(name, f"expected True or False, got {getattr(self, name)!r}")
        if self.reg_type not in PENALTY_KINDS:
            raise OptionError("reg_type", f"expected one of {', '.join(PENALTY_KINDS)}, got {self.reg_type!r}")
        if self.encoder not in ENCODERS:
            raise OptionError("encoder", f"expected one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        check_device(self.device)

    def regularizer(self) -> LyapunovRegularizer:
        return LyapunovRegularizer(self.lambda_reg, self.reg_type, self.lambda_target,
                                   self.lyap_threshold, self.warmup_epochs)


@dataclass
class EpochMetrics:
    """One epoch, with seed 002's ``TrainingMetrics`` fields."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lyapunov: Optional[float]
    grad_norm: float
    grad_max_sv: Optional[float]
    grad_min_sv: Optional[float]
    grad_condition: Optional[float]  # seed 000's largest / (smallest + 1e-12), layer mean
    lr: float
    time_sec: float
    grad_condition_eff: Optional[float] = None  # over the numerical rank, worst layer (the alarm's)


@dataclass
class RunResult:
    history: List[EpochMetrics] = field(default_factory=list)
    status: str = "OK"  # or "DIVERGED"
    diverged_epoch: Optional[int] = None

    def to_dict(self) -> dict:
        return {"status": self.status, "diverged_epoch": self.diverged_epoch,
                "history": [asdict(m) for m in self.history]}


def _save_atomic(obj, path: str) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def _write_metrics(path: str, history: List[EpochMetrics]) -> None:
    write_atomic(path, lambda f: f.write("".join(json.dumps(asdict(m)) + "\n" for m in history).encode()))


def _load_checkpoint(path: Optional[str]) -> Optional[dict]:
    """The checkpoint at ``path`` (None if there is none); a RunFileError naming the file if it
    cannot be read or lacks what a resume needs."""
    if not path or not os.path.lexists(path):
        return None
    if os.path.islink(path):
        raise RunFileError(f"{path}: a symbolic link, not a checkpoint this run wrote; remove it to "
                           f"restart the run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, foreign pickle: torch raises many types
        raise RunFileError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: truncated, "
                           f"corrupt or not written by fit); delete it to restart the run") from None
    needed = ("model", "optimizer", "scheduler", "epoch", "history")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise RunFileError(f"{path}: expected a checkpoint with {', '.join(needed)}, got "
                           f"{sorted(state) if isinstance(state, dict) else type(state).__name__}; "
                           f"delete it to restart the run")
    return state


def _restore(state: dict, path: str, model: nn.Module, opt, sched) -> List[EpochMetrics]:
    """Load a checkpoint into the model, optimizer and schedule; its history. A RunFileError
    naming ``path`` when it does not fit (another architecture, a hand-edited history)."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = [EpochMetrics(**m) for m in state["history"]]
        if [m.epoch for m in history] != list(range(1, int(state["epoch"]) + 1)):
            raise ValueError(f"history of epochs {[m.epoch for m in history]} for epoch {state['epoch']}")
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise RunFileError(f"{path}: does not fit this run ({one_line(err)}); delete it to restart "
                           f"the run, or resume with the options it was made with") from None
    return history


# --- randomness ----------------------------------------------------------------------------------
def _seed_of(*keys: int) -> int:
    """A 32-bit seed from integer keys (``SeedSequence``: distinct keys, independent streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


_TRAIN_STEP, _TEST = 1, 2  # stream tags: a step's global draws, the test set's encoding


def _rng_devices(device: str) -> List[int]:
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def detach_state(model: nn.Module) -> None:
    """Detach the tensors neurons keep between calls (snnTorch's ``mem`` buffers, spikingjelly's
    memories, plain tensor attributes) from the autograd graph of the last step, which backward
    has freed: the model stays copyable (``copy.deepcopy``) and picklable."""
    for module in model.modules():
        kept = list(module.named_buffers(recurse=False))
        kept += [(k, v) for k, v in vars(module).items()
                 if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]
        if hasattr(module, "named_memories"):  # spikingjelly's MemoryModule
            kept += [(k, v) for k, v in module.named_memories() if isinstance(v, torch.Tensor)]
        for name, value in kept:
            if value.grad_fn is not None:
                setattr(module, name, value.detach())


def model_input(model: nn.Module, x: torch.Tensor, config: TrainConfig, generator=None) -> torch.Tensor:
    """What the seed models take: sequence models ``(B, T, D)`` (images flattened and encoded over
    ``config.T`` steps, or sequences one value per step), image models the images themselves."""
    if hasattr(model, "input_dim"):  # SpikingMLP / RecurrentSpikingMLP
        if config.encoder == "sequence":
            return encode(x, "sequence").transpose(0, 1)  # (L, B, F) -> (B, L, F)
        flat = x.flatten(1)
        return encode(flat, config.encoder, config.T, generator).transpose(0, 1)
    return x


def _index_batches(indices: torch.Tensor, batch_size: int):
    for i in range(0, len(indices), batch_size):
        yield indices[i: i + batch_size]


def _epoch_order(n: int, config: TrainConfig, epoch: int, ranks: Ranks) -> torch.Tensor:
    """This rank's sample indices for ``epoch``: torch's DistributedSampler, reshuffled every
    epoch from ``(config.seed, epoch)``, so every rank draws from the same permutation and the
    ranks' shares are disjoint (padded to equal length, so every rank takes as many steps)."""
    sampler = DistributedSampler(range(n), num_replicas=ranks.world_size, rank=ranks.rank,
                                 shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def _epoch_generator(config: TrainConfig, epoch: int, ranks: Ranks) -> torch.Generator:
    """Random encoding and augmentation noise of one epoch on one rank, seeded from
    ``(seed, epoch, rank)``: a resumed run draws exactly what the uninterrupted one drew."""
    return torch.Generator().manual_seed(_seed_of(config.seed, epoch, ranks.rank))


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
             generator: Optional[torch.Generator] = None, forward: Optional[Callable] = None,
             loss: Optional[Callable] = None):
    """(mean loss, accuracy) on ``(x, y)``, in eval mode; ``generator`` draws a random encoder's
    spikes; ``forward`` and ``loss`` as in :func:`fit` (the accuracy is NaN when the outputs are
    not logits or spike records). Under torchrun each rank evaluates its share and the totals are
    summed (a collective: every rank calls it)."""
    model.eval()
    ranks = current(config.device)
    mine = torch.arange(len(x))[ranks.shard(len(x))]
    total_loss, correct = 0.0, 0
    for idx in _index_batches(mine, config.batch_size):
        xb, yb = x[idx].to(ranks.device), y[idx].to(ranks.device)
        outputs = (_outputs(model, xb, forward, loss) if forward
                   else model(model_input(model, xb, config, generator))[0])
        total_loss += float(_task_loss(outputs, yb, loss)) * len(idx)
        correct += _correct(outputs, yb)
    total_loss, correct = sum_across_ranks([total_loss, correct])
    return total_loss / len(x), correct / len(x)


def fit(model: nn.Module, data: Dataset, config: TrainConfig, out_dir: Optional[str] = None,
        resume: bool = True, callbacks=(), forward: Optional[Callable] = None,
        loss: Optional[Callable] = None) -> RunResult:
    """Train ``model`` on ``data``; see the module docstring. Returns the run's history and status.

    ``forward(model, x)``: how to run your own model on a batch ``x`` as the data set holds it
    (batch first, e.g. ``(B, C, H, W)``), your time loop included; with ``config.lyapunov`` the
    penalty is estimated on it by :func:`stablespike.lyapunov.finite_difference_lyapunov`, which
    runs it once on the batch extended with twin rows and hands the loss the samples' own outputs.
    Without it, ``model`` is one of the library's models (they encode their input with
    ``config.encoder`` over ``config.T`` steps and return logits).

    ``loss(outputs, y) -> scalar``: the batch-mean task loss of what ``forward`` returns (a tensor
    or a tuple of tensors, e.g. snnTorch's ``(spk_rec, mem_rec)``, each ``(T, B, classes)``) against
    the labels ``y (B,)``, such as ``snntorch.functional.ce_rate_loss()`` applied to ``outputs[0]``;
    default cross-entropy, which needs ``forward`` to return logits ``(B, classes)``. Every output
    must have one dimension of the samples (with the penalty, the one of the extended batch's size;
    a ValueError names ``forward`` when none or, at every batch so far, several have it).

    Accuracy (``train_acc``, ``test_acc``) is read from the outputs: logits ``(B, classes)`` by their
    largest entry; a time-first record ``(T, B, classes)`` (or the first tensor of a tuple, as
    snnTorch's spike record) by its sum over time, the spike count, ties going to the lower class;
    any other output gives an accuracy of NaN (never a guess).

    ``callbacks``: objects with ``on_train_begin(model)``, ``on_batch_end(step, model, loss,
    lyapunov)`` (after ``backward``) and ``on_train_end()``, and optionally ``on_eval_begin()`` /
    ``on_eval_end()`` around each epoch's evaluation and ``on_exception(err)`` when the loop
    raises (an interrupt too), such as :class:`~stablespike.callbacks.DiagnosticsCallback`.

    Under ``torchrun`` (more than one rank) the model is wrapped in DistributedDataParallel, each
    rank takes ``config.batch_size / world size`` samples per step from a DistributedSampler, the
    Lyapunov estimate in the loss is the mean over all ranks' samples, and only rank 0 writes
    (every rank must call ``fit`` with the same arguments: the per-layer figures are merged by a
    collective). The global random generator is left as it was found (each step draws from its own
    seed).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward: expected a function (model, x) -> outputs or None, got {forward!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss: expected a function (outputs, y) -> scalar loss or None, got {loss!r}")
    ranks = setup(config.device)
    local_batch = check_batch_size(config.batch_size, ranks)
    model.to(ranks.device)
    net = data_parallel(model, ranks)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    reg = config.regularizer()
    result, start = RunResult(), 1
    writes = bool(out_dir) and ranks.is_main
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if writes:
        os.makedirs(out_dir, exist_ok=True)
        remove_leftovers(out_dir)  # a killed write's temporary file
    # rank 0 reads the checkpoint and hands it to all: one state even without a shared disk
    state = broadcast_from_main(_load_checkpoint(ckpt) if writes and resume else None)
    if state is not None:
        result.history = _restore(state, ckpt, model, opt, sched)
        start = state["epoch"] + 1
        log.info("resumed from %s at epoch %d", ckpt, start)
    if writes and (result.history or os.path.lexists(metrics_path)):
        _write_metrics(metrics_path, result.history)  # exactly the checkpoint's epochs, once each
    writer = _tensorboard(out_dir) if writes else None
    # the per-layer figures TensorBoard shows; every rank records (the report is merged over ranks)
    profiler = (SpikeProfiler().attach(model) if out_dir and config.diagnostics and _tensorboard_installed()
                else None)
    for cb in callbacks:
        cb.on_train_begin(model)
    try:
        # the profiler's hooks go when the loop ends, even by an exception
        with torch.random.fork_rng(devices=_rng_devices(ranks.device)), (profiler or contextlib.nullcontext()):
            for epoch in range(start, config.epochs + 1):
                metrics = _train_epoch(model, net, data, config, opt, reg, epoch, ranks, local_batch, callbacks,
                                       forward, loss)
                if metrics is None:
                    result.status, result.diverged_epoch = "DIVERGED", epoch
                    log.warning("run diverged at epoch %d (non-finite loss)", epoch)
                    break
                average_buffers(model)  # every rank evaluates and saves the same model
                layers = _epoch_layers(profiler)  # the training batches' figures, before evaluation
                test_gen = torch.Generator().manual_seed(_seed_of(config.seed, epoch, ranks.rank, _TEST))
                _tell(callbacks, "on_eval_begin")  # their hooks count training batches only
                metrics.test_loss, metrics.test_acc = evaluate(model, data.x_test, data.y_test, config, test_gen,
                                                               forward, loss)
                _tell(callbacks, "on_eval_end")
                sched.step()
                metrics.lr = sched.get_last_lr()[0]
                result.history.append(metrics)
                if writes:  # the checkpoint first: a metrics line never runs ahead of it
                    _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "epoch": epoch,
                                  "history": [asdict(m) for m in result.history]}, ckpt)
                    append_line(metrics_path, json.dumps(asdict(metrics)))
                if writer is not None:
                    for key, value in asdict(metrics).items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
                    TensorBoardSink(writer=writer)({"global_step": epoch, **layers})
                if profiler is not None:
                    profiler.resume()
    except BaseException as err:  # KeyboardInterrupt too: callbacks take their hooks off the model
        _tell(callbacks, "on_exception", err)
        raise
    for cb in callbacks:
        cb.on_train_end()
    if writer is not None:
        writer.close()
    return result


def _tell(callbacks, hook: str, *args) -> None:
    """Call ``hook(*args)`` on the callbacks that define it (optional hooks of the protocol)."""
    for cb in callbacks:
        if callable(getattr(cb, hook, None)):
            getattr(cb, hook)(*args)


def _epoch_layers(profiler: Optional[SpikeProfiler]) -> dict:
    """``{"health_score", "layers": {layer: figures}}`` of the epoch's training batches (a
    collective under torchrun); the profiler is reset, and paused until the next epoch."""
    if profiler is None:
        return {}
    report = profiler.report()
    profiler.reset()
    profiler.pause()  # evaluation is not training
    return {"health_score": report.health_score,
            "layers": {ls.name: layer_row(ls) for ls in report.layer_stats.values()}}


def _tensorboard_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard(out_dir):
    if not out_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: no event files, nothing else changes
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _logits(net: nn.Module, x: torch.Tensor, forward: Callable) -> torch.Tensor:
    """``forward(net, x)``, checked to be the logits ``(B, classes)`` of the batch."""
    logits, rows = forward(net, x), _output_rows(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"forward: expected it to return logits (B, classes) = ({rows}, ...) "
                         f"for a batch of {rows}, got {got}")
    return logits


def _output_rows(x: torch.Tensor) -> int:
    """The rows a forward on the batch ``x`` returns: with the twin engine running, the samples
    and the twin rows it appends at the model's neurons."""
    layout = active_rows()
    return x.shape[0] if layout is None else layout.total


def _outputs(net: nn.Module, x: torch.Tensor, forward: Callable, loss: Optional[Callable]):
    """``forward(net, x)``; checked to be logits when the default loss needs them."""
    return _logits(net, x, forward) if loss is None else forward(net, x)


def _task_loss(outputs, y: torch.Tensor, loss: Optional[Callable]) -> torch.Tensor:
    """The batch-mean task loss: cross-entropy of logits, or the user's ``loss(outputs, y)``."""
    if loss is None:
        return F.cross_entropy(outputs, y)
    value = loss(outputs, y)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss: expected it to return a scalar tensor (the batch mean), got {got}")
    return value.reshape(())


def _correct(outputs, y: torch.Tensor) -> float:
    """How many of the batch's predictions are right; NaN if the outputs hold no prediction: logits
    ``(B, classes)``, or a time-first record ``(T, B, classes)`` (the first of a tuple) summed over time."""
    while isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[0]
    if not isinstance(outputs, torch.Tensor):
        return math.nan
    if outputs.dim() == 3 and outputs.shape[1] == len(y):
        outputs = outputs.sum(0)
    if outputs.dim() != 2 or outputs.shape[0] != len(y):
        return math.nan
    return float((outputs.argmax(1) == y).sum())


def _step_outputs(model, net, xb, config: TrainConfig, gen, forward: Optional[Callable], loss: Optional[Callable],
                  twin_forward: Optional["_SamplesFirst"] = None):
    """``(outputs, exponent or None)`` of one training batch. The library's models take their
    encoded input and estimate the exponent themselves; with a user's ``forward``, one run of the
    twin engine gives both (its ``outputs`` are the samples' own outputs). ``twin_forward``: the
    user's forward wrapped for the twin engine (needed with the penalty and a user's ``loss``)."""
    if forward is None:
        kw = {"compute_lyapunov": True, "lyap_eps": config.lyap_eps,
              "lyap_fraction": config.lyap_fraction} if config.lyapunov else {}
        logits, lam, _ = net(model_input(model, xb, config, gen), **kw)
        return logits, lam
    if not config.lyapunov:
        return _outputs(net, xb, forward, loss), None
    # the engine keeps the samples' rows along output_batch_dim: 0 for logits; any other output
    # (a time-first spike record, a tuple) is run with its samples' dimension moved first
    run = (lambda m, x: _logits(m, x, forward)) if loss is None else twin_forward
    res = finite_difference_lyapunov(net, xb, forward=run, batch_dim=0, output_batch_dim=0, eps=config.lyap_eps,
                                     fraction=config.lyap_fraction)
    return (res.outputs if loss is None else twin_forward.restore(res.outputs)), res.exponent


def _each_tensor(outputs, fn: Callable, counter: Optional[list] = None):
    """``outputs`` (a tensor, or tuples / lists of them, other entries passed as they are) with
    each tensor ``t`` replaced by ``fn(i, t)``, ``i`` counting the tensors in order."""
    counter = [0] if counter is None else counter
    if isinstance(outputs, torch.Tensor):
        counter[0] += 1
        return fn(counter[0] - 1, outputs)
    if isinstance(outputs, (tuple, list)):
        items = [_each_tensor(o, fn, counter) for o in outputs]
        return type(outputs)(*items) if hasattr(outputs, "_fields") else type(outputs)(items)
    return outputs


class _SamplesFirst:
    """A user's ``forward`` as the twin engine runs it (outputs with the ``B + K`` rows of the
    samples and the twins the engine appends at the neurons), each output tensor with its samples' dimension moved first; :meth:`restore`
    moves it back in the engine's nominal outputs. That dimension is the one of size ``B + K``;
    where several are (a time or class axis as long as the extended batch, say at a short last
    batch), the one an earlier batch of the epoch showed: never a guess."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.known: dict = {}  # output index -> its samples' dimension, from an unambiguous batch
        self.moved: dict = {}  # the same for the last call

    def __call__(self, model, x):
        self.moved = {}
        total = _output_rows(x)
        return _each_tensor(self.forward(model, x), lambda i, t: self._first(i, t, total))

    def _first(self, i: int, t: torch.Tensor, total: int) -> torch.Tensor:
        dims = [d for d in range(t.dim()) if t.shape[d] == total]
        if len(dims) == 1:
            self.known[i] = dims[0]
        elif self.known.get(i) not in dims:
            what = (f"several dimensions of size {total}, the batch with the twin rows the Lyapunov penalty "
                    f"adds, and no earlier batch told which indexes the samples; choose another "
                    f"config.batch_size or config.lyap_fraction" if dims else
                    f"no dimension of size {total}, the batch with the twin rows the Lyapunov penalty adds; "
                    f"expected the samples along one dimension of every output")
            raise ValueError(f"forward: output {i} has shape {tuple(t.shape)}, with {what}")
        self.moved[i] = self.known[i]
        return t.movedim(self.known[i], 0)

    def restore(self, outputs):
        return _each_tensor(outputs, lambda i, t: t.movedim(0, self.moved[i]))


def _train_epoch(model, net, data, config, opt, reg, epoch, ranks, local_batch,
                 callbacks, forward=None, task_loss=None) -> Optional[EpochMetrics]:
    """One epoch; ``net`` is ``model`` or its DDP wrapper. None if the loss became non-finite."""
    model.train()
    t0, total_loss, correct, seen = time.time(), 0.0, 0, 0
    lyaps, norms, svs = [], [], []
    gen = _epoch_generator(config, epoch, ranks)
    order = _epoch_order(len(data.x_train), config, epoch, ranks)
    n_batches = math.ceil(len(order) / local_batch)
    twin_forward = _SamplesFirst(forward) if forward is not None else None
    batches = _index_batches(order, local_batch)
    for i, idx in enumerate(_progress(batches, config.progress and ranks.is_main, f"epoch {epoch}", n_batches)):
        # dropout masks and the Lyapunov twins' directions and rows draw from the global
        # generator: seeded per step, so a resumed run draws what the uninterrupted one drew
        torch.manual_seed(_seed_of(config.seed, epoch, ranks.rank, _TRAIN_STEP, i))
        xb, yb = data.x_train[idx], data.y_train[idx]
        if config.augment and xb.dim() == 4:
            xb = augment_cifar(xb, gen)
        xb, yb = xb.to(ranks.device), yb.to(ranks.device)
        opt.zero_grad(set_to_none=True)
        outputs, lam = _step_outputs(model, net, xb, config, gen, forward, task_loss, twin_forward)
        loss = _task_loss(outputs, yb, task_loss)
        if lam is not None:
            lam = mean_across_ranks(lam)  # every rank's samples, as one process would see them
            loss = loss + reg(lam, epoch)
            lyaps.append(float(lam.detach()))
        if any_rank(not torch.isfinite(loss)):
            detach_state(model)
            return None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        norms.append(gradient_norm(model))
        if i % config.sv_every == 0:
            spectra = _gradient_spectra(model)
            if spectra:
                rtol = _rank_tolerance(model)
                svs.append((float(max(s[0] for s in spectra.values())),
                            float(min(s[-1] for s in spectra.values())),
                            float(sum(_condition(s) for s in spectra.values()) / len(spectra)),
                            max(effective_condition(s, rtol[name]) for name, s in spectra.items())))
        opt.step()
        detach_state(model)  # the neurons' kept state must not hold the freed graph
        for cb in callbacks:
            cb.on_batch_end(i, model, loss, lam)
        total_loss += float(loss.detach()) * len(xb)
        correct += _correct(outputs, yb)
        seen += len(xb)
    total_loss, correct, seen = sum_across_ranks([total_loss, correct, seen])
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    sv = [mean([s[j] for s in svs]) for j in range(4)] if svs else [None] * 4
    return EpochMetrics(epoch, total_loss / seen, correct / seen, math.nan, math.nan, mean(lyaps),
                        mean(norms), sv[0], sv[1], sv[2], opt.param_groups[0]["lr"], time.time() - t0,
                        sv[3])
