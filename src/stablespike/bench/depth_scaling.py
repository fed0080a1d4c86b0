"""The depth-scaling experiment of seed 002: depths x {vanilla, lyapunov} x seeds.

Each run trains a fresh model (spiking MLP of ``width`` units per layer, or the spiking VGG with
seed 002's depth-to-stages mapping) with :func:`stablespike.train.fit`. A run's result is written
atomically to ``runs/<method>_d<depth>_s<seed>.json`` as soon as it finishes; ``results.json``
(seed 002's format: ``{method: {depth: [epoch metrics]}}``, first seed) and
``results_seeds.json`` (every seed, with status) are rewritten after every run, so a killed sweep
loses at most the run in progress, and ``resume=True`` skips the runs already done (a run killed
mid-way resumes from its last epoch checkpoint). Under torchrun every run is data-parallel over
the ranks and rank 0 writes; ``jobs > 1`` runs independent runs in parallel processes instead.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

import torch

from ..data import load_dataset
from ..distributed import broadcast_from_main, current, setup
from ..models import SpikingMLP, SpikingVGG
from ..streaming import FiringRateMonitor
from ..surrogate import fast_sigmoid
from ..train import TrainConfig, fit, model_input

log = logging.getLogger(__name__)
METHODS = ("vanilla", "lyapunov")
INITS = ("default", "stable", "calibrated", "fluctuation")


@dataclass
class SweepConfig:
    dataset: str = "digits"
    model: str = "mlp"
    depths: List[int] = field(default_factory=lambda: [2, 4])
    seeds: List[int] = field(default_factory=lambda: [0])
    width: int = 128
    stable_init: bool = False
    init: str = "default"  # default | stable | calibrated | fluctuation
    inits: Optional[List[str]] = None  # several inits side by side; default: [init]
    target_rate: float = 0.1
    surrogate_slope: float = 25.0  # fast-sigmoid slope of every neuron (seed 002: 25)
    data_dir: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model not in ("mlp", "vgg"):
            raise ValueError(f"model: expected 'mlp' or 'vgg', got {self.model!r}")
        if not self.depths or any(int(d) < 1 for d in self.depths):
            raise ValueError(f"depths: expected depths >= 1, got {self.depths!r}")
        if not self.surrogate_slope > 0:
            raise ValueError(f"surrogate_slope: expected a positive number, got {self.surrogate_slope!r}")
        if self.stable_init:  # seed 002's flag is an alias of init="stable"
            self.init = "stable"
        self.inits = list(self.inits or [self.init])
        for init in self.inits:
            if init not in INITS:
                raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")

    def variants(self):
        """(name, init, method) of every run kind: 'vanilla', 'lyapunov', 'calibrated',
        'calibrated+lyapunov', ..."""
        out = []
        for init in self.inits:
            for method in METHODS:
                name = method if init == "default" else (init if method == "vanilla" else f"{init}+{method}")
                out.append((name, init, method))
        return out


def vgg_stages(depth: int):
    """Seed 002's mapping of a total conv depth to (stages, blocks per stage)."""
    return (depth, 1) if depth <= 4 else (4, depth // 4)


def build_model(cfg: SweepConfig, depth: int, data, init: Optional[str] = None) -> torch.nn.Module:
    init = init or cfg.inits[0]
    if cfg.model == "mlp":
        in_dim = 1 if cfg.train.encoder == "sequence" else int(torch.tensor(data.input_shape).prod())
        model = SpikingMLP(in_dim, [cfg.width] * depth, data.num_classes,
                           spike_grad=fast_sigmoid(cfg.surrogate_slope))
    else:
        if data.kind != "image":
            raise ValueError(f"model: the VGG needs images, {data.name} is a {data.kind} data set")
        stages, blocks = vgg_stages(depth)
        model = SpikingVGG.for_input(data.input_shape, num_classes=data.num_classes, num_stages=stages,
                                     blocks_per_stage=blocks, T=cfg.train.T, stable_init=init == "stable",
                                     spike_grad=fast_sigmoid(cfg.surrogate_slope))
    if init in ("calibrated", "fluctuation"):
        from ..init import calibrate, fluctuation_init
        batch = model_input(model, data.x_train[:256], cfg.train)  # a fixed calibration batch
        report = (calibrate(model, batch, target_rate=cfg.target_rate) if init == "calibrated"
                  else fluctuation_init(model, batch, target_rate=cfg.target_rate))
        log.info("%s init:\n%s", init, report)
    return model


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
    shared between them); under torchrun every rank takes part in every run instead.
    """
    ranks = setup(cfg.train.device)
    if int(jobs) != jobs or jobs < 1:
        raise ValueError(f"jobs: expected an integer >= 1, got {jobs!r}")
    if jobs > 1 and ranks.distributed:
        raise ValueError(f"jobs: expected 1 under torchrun (the {ranks.world_size} ranks already "
                         f"share each run), got {jobs}")
    if ranks.is_main:
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
        _write_json({**asdict(cfg), "train": asdict(cfg.train)}, os.path.join(out_dir, "config.json"))
    done = [key for key in run_keys(cfg) if resume and os.path.exists(_run_path(out_dir, key))]
    done = set(broadcast_from_main(done))  # rank 0's disk decides: all ranks run the same runs
    for key in done:
        log.info("%s: done already, skipped", key.name)
    pending = [key for key in run_keys(cfg) if key not in done]
    if jobs == 1:
        data = _dataset(cfg)
        for key in pending:
            run_one(cfg, out_dir, key, resume, data)
            if ranks.is_main:
                _write_results(cfg, out_dir)
    else:
        _run_parallel(cfg, out_dir, pending, resume, jobs)
    return broadcast_from_main(_write_results(cfg, out_dir) if ranks.is_main else None)


def _run_path(out_dir: str, key: RunKey) -> str:
    return os.path.join(out_dir, "runs", key.name + ".json")


def _dataset(cfg: SweepConfig):
    return load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seeds[0])


def run_one(cfg: SweepConfig, out_dir: str, key: RunKey, resume: bool = False, data=None) -> Dict:
    """Train one run of the sweep and (on rank 0) write its record atomically; returns it."""
    data = data if data is not None else _dataset(cfg)
    torch.manual_seed(key.seed)
    model = build_model(cfg, key.depth, data, key.init)
    train_cfg = TrainConfig(**{**asdict(cfg.train), "seed": key.seed, "lyapunov": key.method == "lyapunov"})
    result = fit(model, data, train_cfg, os.path.join(out_dir, "runs", key.name), resume=resume)
    record = {**result.to_dict(), "variant": key.variant, "method": key.method, "init": key.init,
              "depth": key.depth, "seed": key.seed, "params": sum(p.numel() for p in model.parameters())}
    if result.status == "OK":
        record["layer_rates"] = layer_rates(model, data, train_cfg)
        record["verdict"] = verdict(model, data, train_cfg)
    if current().is_main:
        _write_json(record, _run_path(out_dir, key))
    log.info("%s: %s, test acc %s", key.name, result.status,
             f"{result.history[-1].test_acc:.3f}" if result.history else "-")
    return record


def _run_parallel(cfg: SweepConfig, out_dir: str, keys: List[RunKey], resume: bool, jobs: int) -> None:
    """``jobs`` worker processes (spawned: no forked torch thread pools), each with its share of
    the cores; each finished run is on disk before the summary files are rewritten."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    threads = max(1, (os.cpu_count() or 1) // jobs)
    quiet = replace(cfg, train=replace(cfg.train, progress=False))  # no interleaved bars
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, quiet, out_dir, key, resume): key for key in keys}
        try:
            for future in as_completed(futures):
                future.result()
                _write_results(cfg, out_dir)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _write_results(cfg: SweepConfig, out_dir: str) -> Dict:
    by_seed: Dict = {name: {} for name, _, _ in cfg.variants()}
    for depth in cfg.depths:
        for name, _, _ in cfg.variants():
            for seed in cfg.seeds:
                path = os.path.join(out_dir, "runs", f"{name}_d{depth}_s{seed}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        by_seed[name].setdefault(str(depth), {})[str(seed)] = json.load(f)
    first = str(cfg.seeds[0])  # seed 002's results.json holds one seed
    seed_format = {m: {d: runs[first]["history"] for d, runs in depths.items() if first in runs}
                   for m, depths in by_seed.items()}
    _write_json(seed_format, os.path.join(out_dir, "results.json"))
    _write_json(by_seed, os.path.join(out_dir, "results_seeds.json"))
    return by_seed


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
        report = profiler.report(sync=False)
        found = {"health_score": report.health_score,
                 "findings": [f"{p.severity.value} {p.category} @ {p.layer}" for p in report.pathologies]}
    return broadcast_from_main(found)
