"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a one-epoch digits
sweep (vanilla and Lyapunov-regularized MLP) in DDP, plus what each rank saw, for the test to check.

Writes into ``<out>/rank<r>/``: the final weights of each run (``run<i>.pt``), the Lyapunov
estimate of each training batch on this rank before the all-reduce (``local_lyap``), the files
the sweep wrote from this rank (``written``), the gradient of a penalty on the mean over ranks
(``penalty_grad``) and the error a batch of 63 gives (``bad_batch``)
what a resumed run did (``resume``) and the profiler's merged report (``profile``).
"""
import json
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import stablespike.bench.depth_scaling as ds
import stablespike.train as train
from stablespike import distributed
from stablespike.callbacks import DiagnosticsCallback
from stablespike.bench import SweepConfig, run_sweep
from stablespike.data import load_dataset
from stablespike.models import SpikingMLP, SpikingVGG
from stablespike.profiler import SpikeProfiler
from stablespike.train import TrainConfig, model_input

out = sys.argv[1]
rank = int(os.environ["RANK"])
mine = os.path.join(out, f"rank{rank}")
os.makedirs(mine, exist_ok=True)
seen = {"local_lyap": [], "written": [], "bad_batch": None}
models = []

real_write, real_save, real_build = ds._write_json, train._save_atomic, ds.build_model


def write_json(obj, path):
    seen["written"].append(path)
    real_write(obj, path)


def save_atomic(obj, path):
    seen["written"].append(path)
    real_save(obj, path)


def build_model(*args, **kwargs):
    model = real_build(*args, **kwargs)

    def record(module, inputs, output):  # DDP calls the module: the rank's own estimate
        if module.training and output[1] is not None:
            seen["local_lyap"].append(float(output[1].detach()))

    model.register_forward_hook(record)
    models.append(model)
    return model


ds._write_json, train._save_atomic, ds.build_model = write_json, save_atomic, build_model
assert distributed.setup().world_size == 2


class Scale(torch.nn.Module):  # lambda_r = w * mean(x_r): the gradient of a penalty on the mean
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return (self.w * x).mean()


net = DistributedDataParallel(Scale())
x = torch.arange(4.0) + 4 * rank  # the ranks' shares of 0..7
(distributed.mean_across_ranks(net(x)) ** 2).backward()
seen["penalty_grad"] = float(net.module.w.grad)

try:  # a global batch the world size does not divide
    train.fit(SpikingMLP(64, [8], 10), load_dataset("digits"), TrainConfig(epochs=1, batch_size=63, progress=False))
except ValueError as err:
    seen["bad_batch"] = str(err)

cfg = SweepConfig(dataset="digits", depths=[2], seeds=[0], width=32,
                  train=TrainConfig(epochs=2, batch_size=64, T=4, lyap_eps=1e-3, progress=False))
run_sweep(cfg, os.path.join(out, "sweep"))
# the profiler on the trained Lyapunov run: each rank its share of 256 test samples, merged report
profiled = models[1].eval()
share = load_dataset("digits").x_test[:256][rank::2]
with SpikeProfiler().attach(profiled) as profiler, torch.no_grad():
    profiled(model_input(profiled, share, cfg.train))
report = profiler.report()
seen["profile"] = report.to_dict()
seen["profile_rates"] = {n: s.firing_rates.tolist() for n, s in report.layer_stats.items()}

# resume: a 1-epoch run continued to 2 epochs; rank 0 reads the checkpoint and hands it to rank 1
digits, resumed = load_dataset("digits"), os.path.join(out, "resume")
small = dict(batch_size=64, T=4, progress=False)
torch.manual_seed(0)
model = SpikingMLP(64, [16], 10)
train.fit(model, digits, TrainConfig(epochs=1, **small), resumed)
loads = []
real_load = train._load_checkpoint
train._load_checkpoint = lambda path: (loads.append(path), real_load(path))[1]
sunk = []  # the diagnostics callback: its merged report on every rank, its sink on rank 0 only
diagnostics = DiagnosticsCallback(every=5, sink=sunk.append)
result = train.fit(model, digits, TrainConfig(epochs=2, **small), resumed, resume=True, callbacks=[diagnostics])
seen["resume"] = {"epochs": [m.epoch for m in result.history], "loads": len(loads)}
seen["diagnostics"] = {"sunk": len(sunk), "history": len(diagnostics.history)}
models.append(model)

# a VGG with batch norm in DDP: weights and running statistics must agree on both ranks
torch.manual_seed(0)
vgg = SpikingVGG.for_input(digits.input_shape, num_classes=10, base_channels=8, num_stages=2,
                           blocks_per_stage=1, T=2)
train.fit(vgg, digits, TrainConfig(epochs=1, batch_size=64, T=2, lyapunov=True, lyap_fraction=0.25,
                                   progress=False))
models.append(vgg)
for i, model in enumerate(models):
    torch.save(model.state_dict(), os.path.join(mine, f"run{i}.pt"))
with open(os.path.join(mine, "seen.json"), "w") as f:
    json.dump(seen, f)
