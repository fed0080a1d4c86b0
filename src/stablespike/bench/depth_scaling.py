"""The depth-scaling experiment of seed 002: depths x {vanilla, lyapunov} x seeds.

Each run trains a fresh model (spiking MLP of ``width`` units per layer, or the spiking VGG of
``width`` base channels with seed 002's depth-to-stages mapping) with :func:`stablespike.train.fit`,
on the whole data set or a stratified, seeded subset (``train_subset``, ``test_subset``). A run's
result is written atomically to ``runs/<method>_d<depth>_s<seed>.json`` as soon as it finishes. Those run files are
the source of truth: ``results.json`` (seed 002's format: ``{method: {depth: [epoch metrics]}}``,
first seed) and ``results_seeds.json`` (every seed, with status) are made from them after every
run, and a summary that says something the run files do not (edited by hand, corrupt) is refused
with an error naming it rather than silently overwritten or ignored.

A killed sweep loses at most the epoch in progress: ``resume=True`` skips the runs already done
and continues a run from its last epoch checkpoint, to the results the uninterrupted sweep gives.
The sweep records its options in ``config.json`` and refuses to resume with different ones. One
process at a time owns a sweep directory (``sweep.lock`` holds its pid; a lock whose process is
gone is taken over). Under torchrun every run is data-parallel over the ranks and rank 0 writes;
``jobs > 1`` runs independent runs in parallel worker processes instead, which exit as soon as
their parent is gone and never write after it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Optional

import torch

from ..data import DATASETS, load_dataset
from ..distributed import broadcast_from_main, current, setup
from ..models import SpikingMLP, SpikingVGG
from ..streaming import FiringRateMonitor
from ..surrogate import fast_sigmoid
from ..options import OptionError, check_integer, check_number
from ..runfiles import RunFileError, remove_leftovers, write_json
from ..train import EpochMetrics, TrainConfig, detach_state, fit, model_input
from .lock import acquire_lock, release_lock
from .workers import run_parallel

log = logging.getLogger(__name__)
METHODS = ("vanilla", "lyapunov")
INITS = ("default", "stable", "calibrated", "fluctuation")


@dataclass
class SweepConfig:
    """The sweep's options, each checked at construction (an :class:`OptionError` naming it)."""

    dataset: str = "digits"
    model: str = "mlp"
    depths: List[int] = field(default_factory=lambda: [2, 4])
    seeds: List[int] = field(default_factory=lambda: [0])
    width: Optional[int] = None  # MLP units per layer (default 128), VGG base channels (64, seed 002)
    stable_init: bool = False
    init: str = "default"  # default | stable | calibrated | fluctuation
    inits: Optional[List[str]] = None  # several inits side by side; default: [init]
    target_rate: float = 0.1
    surrogate_slope: float = 25.0  # fast-sigmoid slope of every neuron (seed 002: 25)
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None  # at most this many training samples (stratified, seeded)
    test_subset: Optional[int] = None  # ... and test samples
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise OptionError("dataset", f"expected one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.model not in ("mlp", "vgg"):
            raise OptionError("model", f"expected 'mlp' or 'vgg', got {self.model!r}")
        for name, minimum in (("depths", 1), ("seeds", 0)):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
                raise OptionError(name, f"expected a non-empty list of integers >= {minimum}, got {values!r}")
            setattr(self, name, [check_integer(v, name, minimum) for v in values])
            if len(set(getattr(self, name))) != len(values):
                raise OptionError(name, f"expected distinct values, got {values!r}")
        if self.width is None:
            self.width = 128 if self.model == "mlp" else 64
        check_integer(self.width, "width", 1)
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_integer(getattr(self, name), name, 1)
        check_number(self.target_rate, "target_rate", 0, 1, low_open=True, high_open=True)
        check_number(self.surrogate_slope, "surrogate_slope", 0, low_open=True)
        if self.data_dir is not None:
            if not isinstance(self.data_dir, (str, os.PathLike)):
                raise OptionError("data_dir", f"expected a directory path, got {self.data_dir!r}")
            self.data_dir = os.fspath(self.data_dir)  # config.json holds it as text
        if not isinstance(self.train, TrainConfig):
            raise OptionError("train", f"expected a TrainConfig, got {type(self.train).__name__}")
        if self.stable_init:  # seed 002's flag is an alias of init="stable"
            self.init = "stable"
        self.inits = list(self.inits or [self.init])
        for init in self.inits:
            if init not in INITS:
                raise OptionError("inits" if len(self.inits) > 1 else "init",
                                  f"expected one of {', '.join(INITS)}, got {init!r}")

    def variants(self):
        """(name, init, method) of every run kind: 'vanilla', 'lyapunov', 'calibrated',
        'calibrated+lyapunov', ..."""
        out = []
        for init in self.inits:
            for method in METHODS:
                name = method if init == "default" else (init if method == "vanilla" else f"{init}+{method}")
                out.append((name, init, method))
        return out

    def to_dict(self) -> Dict:
        """What ``config.json`` holds."""
        return {**asdict(self), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, config: Dict, device: Optional[str] = None) -> "SweepConfig":
        """The config a ``config.json`` holds (its ``device`` replaced by ``device`` if given: a
        report is rendered anywhere); a TypeError or OptionError if it is not one."""
        train = dict(config["train"])
        if device is not None:
            train["device"] = device
        own = {f.name for f in fields(cls)} - {"train"}
        return cls(**{k: v for k, v in config.items() if k in own}, train=TrainConfig(**train))


# Options that do not change what a run computes: a sweep may be resumed with other values.
_NOT_DEFINING = {"data_dir", "stable_init", "init", "train.progress", "train.device", "train.seed",
                 "train.diagnostics"}


def _defining(config: Dict) -> Dict:
    flat = {k: v for k, v in config.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in config.get("train", {}).items()})
    return {k: v for k, v in flat.items() if k not in _NOT_DEFINING}


def check_same_options(cfg: SweepConfig, out_dir: str) -> None:
    """Refuse to resume the sweep in ``out_dir`` with options that change what a run computes
    (an :class:`OptionError` naming the first such option, its recorded and its new value)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return  # nothing recorded: a new sweep
    old = _read_json(path, dict)
    new = json.loads(json.dumps(cfg.to_dict()))
    if not isinstance(old.get("train"), dict):
        raise RunFileError(f"{path}: expected the sweep's options with a 'train' section; is it a sweep directory?")
    recorded, given = _defining(old), _defining(new)
    for key in sorted(recorded.keys() & given.keys()):
        if recorded[key] != given[key]:
            option = key.split(".")[-1]
            raise OptionError(option, f"the sweep in {out_dir} was run with {recorded[key]!r}, now "
                                      f"{given[key]!r}; resume it with the options it was started "
                                      f"with, or start a new sweep elsewhere")


def _read_json(path: str, kind: type):
    """The JSON in ``path``, of type ``kind``; a RunFileError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise RunFileError(f"{path}: cannot be read as JSON ({' '.join(str(err).split())})") from None
    if not isinstance(value, kind):
        raise RunFileError(f"{path}: expected a JSON {kind.__name__}, got a {type(value).__name__}")
    return value


def vgg_stages(depth: int):
    """Seed 002's mapping of a total conv depth to (stages, blocks per stage)."""
    return (depth, 1) if depth <= 4 else (4, depth // 4)


def build_model(cfg: SweepConfig, depth: int, data, init: Optional[str] = None,
                verbose: bool = True) -> torch.nn.Module:
    """A fresh model of the sweep at ``depth``, initialized by ``init``; ``verbose`` logs a
    calibration's table (the regularized twin of a run would print the same one again)."""
    init = init or cfg.inits[0]
    if cfg.model == "mlp":
        in_dim = 1 if cfg.train.encoder == "sequence" else int(torch.tensor(data.input_shape).prod())
        model = SpikingMLP(in_dim, [cfg.width] * depth, data.num_classes,
                           spike_grad=fast_sigmoid(cfg.surrogate_slope))
    else:
        if data.kind != "image":
            raise ValueError(f"model: the VGG needs images, {data.name} is a {data.kind} data set")
        stages, blocks = vgg_stages(depth)
        model = SpikingVGG.for_input(data.input_shape, num_classes=data.num_classes,
                                     base_channels=cfg.width, num_stages=stages,
                                     blocks_per_stage=blocks, T=cfg.train.T, stable_init=init == "stable",
                                     spike_grad=fast_sigmoid(cfg.surrogate_slope))
    if init in ("calibrated", "fluctuation"):
        from ..init import calibrate, fluctuation_init
        batch = model_input(model, data.x_train[:256], cfg.train)  # a fixed calibration batch
        report = (calibrate(model, batch, target_rate=cfg.target_rate) if init == "calibrated"
                  else fluctuation_init(model, batch, target_rate=cfg.target_rate))
        log.log(logging.INFO if verbose else logging.DEBUG, "%s init, depth %d:\n%s", init, depth, report)
    return model


def _write_json(obj, path: str) -> None:
    write_json(obj, path)


def layer_rates(model, data, cfg: TrainConfig, n: int = 256) -> Dict[str, float]:
    """Mean firing rate per neuron layer on the first ``n`` test samples (under torchrun each
    rank takes its share and the counts are merged: the same table as one process)."""
    model.eval()
    ranks = current(cfg.device)
    x = data.x_test[:n][ranks.shard(min(n, len(data.x_test)))]
    with FiringRateMonitor(model) as monitor, torch.no_grad():
        model(model_input(model, x.to(ranks.device), cfg))
    return {row["layer"]: row["mean"] for row in monitor.table()}


@dataclass(frozen=True)
class RunKey:
    """One run of the sweep: a depth, a variant (init and method) and a seed."""

    depth: int
    variant: str
    init: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}_d{self.depth}_s{self.seed}"


def run_keys(cfg: SweepConfig) -> List[RunKey]:
    return [RunKey(depth, variant, init, method, seed) for depth in cfg.depths
            for variant, init, method in cfg.variants() for seed in cfg.seeds]


def run_sweep(cfg: SweepConfig, out_dir: str, resume: bool = False, jobs: int = 1) -> Dict:
    """Run (or finish) the sweep into ``out_dir``; returns ``results_seeds`` (see module doc).

    ``jobs > 1`` runs that many runs at once in separate processes (one machine, the cores
    shared between them); under torchrun every rank takes part in every run instead. Everything
    is checked before the first run trains: the options, the memory the widest model needs, that
    ``out_dir`` can be written and no other process holds it, and on resume that the options
    are those the sweep was started with.
    """
    if not isinstance(cfg, SweepConfig):
        raise TypeError(f"cfg: expected a SweepConfig, got {type(cfg).__name__}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise OptionError("jobs", f"expected an integer >= 1, got {jobs!r}")
    ranks = setup(cfg.train.device)
    if jobs > 1 and ranks.distributed:
        raise OptionError("jobs", f"expected 1 under torchrun (the {ranks.world_size} ranks already "
                                  f"share each run), got {jobs}")
    data = _dataset(cfg)  # also in the parent of --jobs: a missing data file is one error, now
    check_memory(cfg, data)
    lock = None
    if ranks.is_main:
        _make_out_dir(out_dir)
        lock = acquire_lock(out_dir)
    try:
        return _run_locked(cfg, out_dir, resume, jobs, ranks, data)
    finally:
        if lock is not None:
            release_lock(lock)


def _run_locked(cfg: SweepConfig, out_dir: str, resume: bool, jobs: int, ranks, data) -> Dict:
    if ranks.is_main:
        if resume:
            check_same_options(cfg, out_dir)
            collect_results(cfg, out_dir, write=False)  # unreadable or edited run files: refuse now
        else:  # a new sweep: summaries of an earlier one here would be stale, not edits
            for name in ("results.json", "results_seeds.json"):
                if os.path.lexists(os.path.join(out_dir, name)):
                    os.unlink(os.path.join(out_dir, name))
        for directory in [out_dir, os.path.join(out_dir, "runs")] + [
                os.path.join(out_dir, "runs", key.name) for key in run_keys(cfg)]:
            remove_leftovers(directory)  # temporary files of writes a kill cut short
        _write_json(cfg.to_dict(), os.path.join(out_dir, "config.json"))
    done = [key for key in run_keys(cfg) if resume and os.path.exists(_run_path(out_dir, key))]
    done = set(broadcast_from_main(done))  # rank 0's disk decides: all ranks run the same runs
    for key in done:
        log.info("%s: done already, skipped", key.name)
    pending = [key for key in run_keys(cfg) if key not in done]
    if jobs == 1:
        for key in pending:
            run_one(cfg, out_dir, key, resume, data)
            if ranks.is_main:
                collect_results(cfg, out_dir)
    else:
        run_parallel(cfg, out_dir, pending, resume, jobs, run_one, _dataset,
                     lambda: collect_results(cfg, out_dir))
    return broadcast_from_main(collect_results(cfg, out_dir) if ranks.is_main else None)


def _make_out_dir(out_dir: str) -> None:
    """Create ``out_dir/runs``; an OptionError naming ``out_dir`` if it cannot be written."""
    try:
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
        probe = os.path.join(out_dir, f".write-test.{os.getpid()}.tmp")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise OptionError("out_dir", f"expected a directory that can be created and written, got "
                                     f"{out_dir!r} ({err.strerror or err})") from None


# --- memory ----------------------------------------------------------------------------------------
def _memory_bytes(device: str) -> Optional[int]:
    """Memory of ``device`` (the GPU's, or this machine's RAM), None where it cannot be read."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: SweepConfig, data) -> None:
    """An OptionError naming ``width`` when the deepest MLP of the sweep would not fit in memory:
    4 float32 copies of every weight (weights, gradients, AdamW's two moments) plus the
    activations kept for backward (about 3 values per neuron, time step and sample)."""
    if cfg.model != "mlp":
        return  # the VGG's channels follow seed 002, not ``width``
    in_dim = 1 if cfg.train.encoder == "sequence" else int(torch.tensor(data.input_shape).prod())
    depth, w = max(cfg.depths), cfg.width
    params = in_dim * w + (depth - 1) * w * w + w * data.num_classes
    steps = cfg.train.T if cfg.train.encoder != "sequence" else int(data.input_shape[-1])
    need = 4 * (4 * params + 3 * cfg.train.batch_size * steps * depth * w)
    have = _memory_bytes(cfg.train.device)
    if have is not None and need > have:
        raise OptionError("width", f"expected a width whose model fits in memory, got {w}: depth {depth} "
                                   f"needs about {need / 2**30:.3g} GiB for its weights, gradients, "
                                   f"optimizer state and activations, and {cfg.train.device} has "
                                   f"{have / 2**30:.3g} GiB")


def _run_path(out_dir: str, key: RunKey) -> str:
    return os.path.join(out_dir, "runs", key.name + ".json")


def _dataset(cfg: SweepConfig):
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seeds[0])
    return data.subset(cfg.train_subset, cfg.test_subset, seed=cfg.seeds[0])


def run_one(cfg: SweepConfig, out_dir: str, key: RunKey, resume: bool = False, data=None) -> Dict:
    """Train one run of the sweep and (on rank 0) write its record atomically; returns it."""
    data = data if data is not None else _dataset(cfg)
    torch.manual_seed(key.seed)
    model = build_model(cfg, key.depth, data, key.init, verbose=key.method == METHODS[0])
    train_cfg = TrainConfig(**{**asdict(cfg.train), "seed": key.seed, "lyapunov": key.method == "lyapunov"})
    result = fit(model, data, train_cfg, os.path.join(out_dir, "runs", key.name), resume=resume)
    record = {**result.to_dict(), "variant": key.variant, "method": key.method, "init": key.init,
              "depth": key.depth, "seed": key.seed, "params": sum(p.numel() for p in model.parameters())}
    if result.status == "OK":
        torch.manual_seed(key.seed)  # the same draws whether the run was resumed or not
        record["layer_rates"] = layer_rates(model, data, train_cfg)
        record["verdict"] = verdict(model, data, train_cfg)
    if current().is_main:
        _write_json(record, _run_path(out_dir, key))
    log.info("%s: %s, test acc %s", key.name, result.status,
             f"{result.history[-1].test_acc:.3f}" if result.history else "-")
    return record


# --- results ---------------------------------------------------------------------------------------
_RUN_FIELDS = {f.name for f in fields(EpochMetrics) if f.default is MISSING}  # later ones optional


def _read_run(path: str) -> Dict:
    """A run file, checked: a RunFileError naming it if it is not one this sweep wrote."""
    run = _read_json(path, dict)
    history = run.get("history")
    ok = (run.get("status") in ("OK", "DIVERGED") and isinstance(history, list)
          and all(isinstance(h, dict) and _RUN_FIELDS <= h.keys() for h in history))
    if not ok:
        raise RunFileError(f"{path}: expected a run record (status OK or DIVERGED, a history of epoch "
                           f"metrics with {', '.join(sorted(_RUN_FIELDS))}); delete it to rerun that run")
    return run


def _same(on_disk, made, levels: int) -> bool:
    """Whether a summary on disk says nothing the run files do not: its keys a subset of theirs
    down ``levels`` levels, the leaves equal (compared as JSON text: NaN equals NaN)."""
    if levels == 0:
        return json.dumps(on_disk, sort_keys=True) == json.dumps(made, sort_keys=True)
    return (isinstance(on_disk, dict) and on_disk.keys() <= made.keys()
            and all(_same(on_disk[k], made[k], levels - 1) for k in on_disk))


def collect_results(cfg: SweepConfig, out_dir: str, write: bool = True) -> Dict:
    """``results_seeds`` made from the run files in ``out_dir/runs`` (the source of truth), and
    with ``write`` ``results.json`` and ``results_seeds.json`` rewritten from it. A RunFileError
    naming the file if a run file cannot be read, or a summary on disk says what the run files do
    not (edited by hand or corrupt: delete it and it is made again)."""
    by_seed: Dict = {name: {} for name, _, _ in cfg.variants()}
    for depth in cfg.depths:
        for name, _, _ in cfg.variants():
            for seed in cfg.seeds:
                path = os.path.join(out_dir, "runs", f"{name}_d{depth}_s{seed}.json")
                if os.path.exists(path):
                    by_seed[name].setdefault(str(depth), {})[str(seed)] = _read_run(path)
    first = str(cfg.seeds[0])  # seed 002's results.json holds one seed
    seed_format = {m: {d: runs[first]["history"] for d, runs in depths.items() if first in runs}
                   for m, depths in by_seed.items()}
    for name, made, levels in (("results_seeds.json", by_seed, 3), ("results.json", seed_format, 2)):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not _same(_read_json(path, dict), made, levels):
            raise RunFileError(f"{path}: differs from the run files in {os.path.join(out_dir, 'runs')} it "
                               f"is made from (edited by hand, or a run file deleted to run it again?); "
                               f"those are the source of truth: delete {name} and it is made again from them")
    if write:
        _write_json(seed_format, os.path.join(out_dir, "results.json"))
        _write_json(by_seed, os.path.join(out_dir, "results_seeds.json"))
    return by_seed


def _write_results(cfg: SweepConfig, out_dir: str) -> Dict:  # the former name
    return collect_results(cfg, out_dir)


def load_sweep(run_dir: str) -> tuple:
    """``(config dict, results_seeds)`` of a finished or running sweep directory, the results made
    from its run files (see :func:`collect_results`); errors name the file at fault."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"RUN_DIR: no config.json in {run_dir!r}; is it a sweep directory?")
    config = _read_json(path, dict)
    try:
        cfg = SweepConfig.from_dict(config, device="cpu")
    except (TypeError, KeyError, ValueError) as err:
        raise RunFileError(f"{path}: not the options of a sweep ({' '.join(str(err).split())})") from None
    return cfg.to_dict(), collect_results(cfg, run_dir)


def verdict(model, data, cfg: TrainConfig, n: int = 128) -> Dict:
    """The profiler's health score and findings after training, on one test batch (forward and
    backward), so that a failing run says why. Under torchrun rank 0 computes it on the whole
    batch and hands it to the others: gradient norms of a share are not those of the batch."""
    from ..profiler import SpikeProfiler
    import torch.nn.functional as F
    ranks = current(cfg.device)
    found = None
    if ranks.is_main:
        model.train()
        x, y = data.x_test[:n].to(ranks.device), data.y_test[:n].to(ranks.device)
        with SpikeProfiler().attach(model) as profiler:
            F.cross_entropy(model(model_input(model, x, cfg))[0], y).backward()
        model.zero_grad(set_to_none=True)
        detach_state(model)  # neurons keep no graph: the model stays copyable
        report = profiler.report(sync=False)
        found = {"health_score": report.health_score,
                 "findings": [f"{p.severity.value} {p.category} @ {p.layer}" for p in report.pathologies]}
    return broadcast_from_main(found)
