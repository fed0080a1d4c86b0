"""The depth-scaling experiment of seed 002: depths x {vanilla, lyapunov} x seeds.

Each run trains a fresh model (spiking MLP of ``width`` units per layer, or the spiking VGG with
seed 002's depth-to-stages mapping) with :func:`stablespike.train.fit`. A run's result is written
atomically to ``runs/<method>_d<depth>_s<seed>.json`` as soon as it finishes; ``results.json``
(seed 002's format: ``{method: {depth: [epoch metrics]}}``, first seed) and
``results_seeds.json`` (every seed, with status) are rewritten after every run, so a killed sweep
loses at most the run in progress, and ``resume=True`` skips the runs already done (a run killed
mid-way resumes from its last epoch checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..data import load_dataset
from ..models import SpikingMLP, SpikingVGG
from ..streaming import FiringRateMonitor
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
    data_dir: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model not in ("mlp", "vgg"):
            raise ValueError(f"model: expected 'mlp' or 'vgg', got {self.model!r}")
        if not self.depths or any(int(d) < 1 for d in self.depths):
            raise ValueError(f"depths: expected depths >= 1, got {self.depths!r}")
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
        model = SpikingMLP(in_dim, [cfg.width] * depth, data.num_classes)
    else:
        if data.kind != "image":
            raise ValueError(f"model: the VGG needs images, {data.name} is a {data.kind} data set")
        stages, blocks = vgg_stages(depth)
        model = SpikingVGG.for_input(data.input_shape, num_classes=data.num_classes, num_stages=stages,
                                     blocks_per_stage=blocks, T=cfg.train.T, stable_init=init == "stable")
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
    """Mean firing rate per neuron layer on the first ``n`` test samples."""
    model.eval()
    with FiringRateMonitor(model) as monitor, torch.no_grad():
        model(model_input(model, data.x_test[:n].to(cfg.device), cfg))
    return {row["layer"]: row["mean"] for row in monitor.table()}


def run_sweep(cfg: SweepConfig, out_dir: str, resume: bool = False) -> Dict:
    """Run (or finish) the sweep into ``out_dir``; returns ``results_seeds`` (see module doc)."""
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seeds[0])
    config = {**asdict(cfg), "train": asdict(cfg.train)}
    _write_json(config, os.path.join(out_dir, "config.json"))
    for depth in cfg.depths:
        for variant, init, method in cfg.variants():
            for seed in cfg.seeds:
                name = f"{variant}_d{depth}_s{seed}"
                done = os.path.join(out_dir, "runs", name + ".json")
                if resume and os.path.exists(done):
                    log.info("%s: done already, skipped", name)
                    continue
                torch.manual_seed(seed)
                model = build_model(cfg, depth, data, init)
                train_cfg = TrainConfig(**{**asdict(cfg.train), "seed": seed, "lyapunov": method == "lyapunov"})
                result = fit(model, data, train_cfg, os.path.join(out_dir, "runs", name), resume=resume)
                record = {**result.to_dict(), "variant": variant, "method": method, "init": init,
                          "depth": depth, "seed": seed, "params": sum(p.numel() for p in model.parameters())}
                if result.status == "OK":
                    record["layer_rates"] = layer_rates(model, data, train_cfg)
                    record["verdict"] = verdict(model, data, train_cfg)
                _write_json(record, done)
                log.info("%s: %s, test acc %s", name, result.status,
                         f"{result.history[-1].test_acc:.3f}" if result.history else "-")
                _write_results(cfg, out_dir)
    return _write_results(cfg, out_dir)


def _write_results(cfg: SweepConfig, out_dir: str) -> Dict:
    by_seed: Dict = {name: {} for name, _, _ in cfg.variants()}
    for depth in cfg.depths:
        for name, _, _ in cfg.variants():
            for seed in cfg.seeds:
                path = os.path.join(out_dir, "runs", f"{name}_d{depth}_s{seed}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        by_seed[name].setdefault(str(depth), {})[str(seed)] = json.load(f)
    first = str(cfg.seeds[0])
    seed_format = {m: {d: runs[first]["history"] for d, runs in depths.items() if first in runs}
                   for m, depths in by_seed.items()}
    _write_json(seed_format, os.path.join(out_dir, "results.json"))
    _write_json(by_seed, os.path.join(out_dir, "results_seeds.json"))
    return by_seed


def verdict(model, data, cfg: TrainConfig, n: int = 128) -> Dict:
    """The profiler's health score and findings after training, on one test batch (forward and
    backward), so that a failing run says why."""
    from ..profiler import SpikeProfiler
    import torch.nn.functional as F
    model.train()
    x, y = data.x_test[:n].to(cfg.device), data.y_test[:n].to(cfg.device)
    with SpikeProfiler().attach(model) as profiler:
        F.cross_entropy(model(model_input(model, x, cfg))[0], y).backward()
    model.zero_grad(set_to_none=True)
    report = profiler.report()
    return {"health_score": report.health_score,
            "findings": [f"{p.severity.value} {p.category} @ {p.layer}" for p in report.pathologies]}
