"""The Lightning callback in a real ``lightning.Trainer`` on an snnTorch tutorial-style model: the
logged per-layer rates equal a FiringRateMonitor's over the same training batches, the report
files land in the log directory, and a 2-process DDP run logs the merged figures once."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import stablespike as ss

pl = pytest.importorskip("lightning.pytorch")
snn = pytest.importorskip("snntorch")
from snntorch import utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EVERY, BATCH, T = 3, 32, 5


class DigitsSNN(pl.LightningModule):
    """snnTorch's tutorial style: ``nn.Sequential`` of ``snn.Leaky(init_hidden=True)``, a time loop
    with ``utils.reset``, cross-entropy on spike counts. ``reference`` is a FiringRateMonitor of
    the test's own, enabled only inside ``training_step``; its per-batch mean rates go to ``seen``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), snn.Leaky(beta=0.9, init_hidden=True),
                                 nn.Linear(32, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
        self.reference = ss.FiringRateMonitor(self.net)
        self.reference.disable()
        self.seen = []  # per training batch: {layer: mean rate}

    def forward(self, x):
        utils.reset(self.net)
        return torch.stack([self.net(x)[0] for _ in range(T)]).sum(0)

    def training_step(self, batch, batch_idx):
        self.reference.enable()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.reference.disable()
        self.seen.append({k: float(v.mean()) for k, v in self.reference.rates().items()})
        self.reference.reset()
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def loaders(n_train=8 * BATCH):
    from stablespike.data import load_dataset
    data = load_dataset("digits")
    train = torch.utils.data.TensorDataset(data.x_train[:n_train], data.y_train[:n_train])
    val = torch.utils.data.TensorDataset(data.x_test[:64], data.y_test[:64])
    return (torch.utils.data.DataLoader(train, batch_size=BATCH),
            torch.utils.data.DataLoader(val, batch_size=BATCH))


def trainer_for(tmp_path, callback, **kw):
    from lightning.pytorch.loggers import CSVLogger
    return pl.Trainer(max_epochs=2, logger=CSVLogger(str(tmp_path), name="run"), callbacks=[callback],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", log_every_n_steps=1, **kw)


def test_logged_rates_equal_a_firing_rate_monitor_over_the_same_training_batches(tmp_path):
    from stablespike.integrations.lightning import DiagnosticsCallback
    module, callback = DigitsSNN(), DiagnosticsCallback(every=EVERY, module="net")
    train, val = loaders()
    trainer = trainer_for(tmp_path, callback)
    trainer.fit(module, train, val)

    steps = [row["step"] for row in callback.history]
    assert steps == list(range(0, 16, EVERY))  # 2 epochs x 8 batches; a row every 3rd step
    assert len(module.seen) == 16  # the validation batches were not recorded by either
    bounds = [-1] + steps
    for row, lo, hi in zip(callback.history, bounds, bounds[1:]):
        window = module.seen[lo + 1: hi + 1]  # the batches since the previous row
        for layer in ("2", "4"):
            expected = sum(b[layer] for b in window) / len(window)
            assert row["layers"][layer]["firing_rate"] == pytest.approx(expected, abs=1e-6)
    log_dir = tmp_path / "run" / "version_0"
    with open(log_dir / "metrics.csv") as f:  # what the logger got, against the reference directly
        logged = [r for r in csv.DictReader(f) if r.get("firing_rate/2")]
    assert [int(r["step"]) for r in logged] == steps
    for r, lo, hi in zip(logged, bounds, bounds[1:]):
        window = module.seen[lo + 1: hi + 1]
        for layer in ("2", "4"):
            assert float(r[f"firing_rate/{layer}"]) == pytest.approx(
                sum(b[layer] for b in window) / len(window), abs=1e-6)
    epoch1 = module.seen[8:]  # the second epoch's report covers its 8 batches
    assert callback.epoch_report.layer_stats["2"].firing_rates.mean() == pytest.approx(
        sum(b["2"] for b in epoch1) / len(epoch1), abs=1e-6)
    for epoch in (0, 1):
        report = json.loads((log_dir / f"diagnostics_epoch{epoch}.json").read_text())
        assert set(report["layers"]) == {"2", "4"} and (log_dir / f"diagnostics_epoch{epoch}.html").exists()
    assert_no_hooks_left(module, callback)


def assert_no_hooks_left(module, callback):
    """After the fit the callback's profiler records nothing, even when asked to resume."""
    callback.recorder.reset()
    callback.recorder.resume()  # would re-enable hooks that were left attached
    module(torch.rand(4, 1, 8, 8)).sum().backward()
    assert callback.recorder.report(sync=False).layer_stats == {}


def test_a_fit_that_raises_leaves_no_hooks(tmp_path):
    from stablespike.integrations.lightning import DiagnosticsCallback

    class Failing(DigitsSNN):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("the user's bug")
            return super().training_step(batch, batch_idx)

    module, callback = Failing(), DiagnosticsCallback(every=1, module="net")
    with pytest.raises(RuntimeError, match="the user's bug"):
        trainer_for(tmp_path, callback).fit(module, loaders(n_train=2 * BATCH)[0])
    assert len(callback.history) == 1  # the first batch made its row before the failure
    module.reference.close()
    assert_no_hooks_left(module, callback)


def test_the_lyapunov_estimate_is_logged_and_leaves_training_as_it_was(tmp_path):
    from stablespike.integrations.lightning import DiagnosticsCallback
    train, val = loaders(n_train=4 * BATCH)

    def forward(net, x):  # the user's time loop, as in the module
        utils.reset(net)
        return torch.stack([net(x)[0] for _ in range(T)]).sum(0)

    weights = []
    for lyap in (None, 2):
        module = DigitsSNN()
        callback = DiagnosticsCallback(every=2, module="net", lyapunov_every=lyap, forward=forward)
        trainer_for(tmp_path / str(lyap), callback, max_steps=4).fit(module, train)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1])  # the estimates changed nothing in training
    with open(tmp_path / "2" / "run" / "version_0" / "metrics.csv") as f:
        lyap = [float(r["diagnostics/lyapunov"]) for r in csv.DictReader(f) if r.get("diagnostics/lyapunov")]
    assert len(lyap) == 2 and all(-5 < v < 5 for v in lyap)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_the_estimate_leaves_a_streaming_spikingjelly_nets_state_as_training_had_it(step_mode):
    """A forward that does not reset: training carries each neuron's v from batch to batch.
    spikingjelly keeps v as a plain attribute, not a buffer, and the estimate left it changed
    (training with lyapunov_every then ended with other weights than without)."""
    from spikingjelly.activation_based import functional, layer, neuron
    from stablespike.integrations.lightning import DiagnosticsCallback
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 16), neuron.LIFNode(tau=2.0), layer.Linear(16, 4), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, step_mode)

    def forward(net, x):  # no reset_net: the state carries over
        if step_mode == "m":
            return net(x.unsqueeze(0).repeat(T, 1, 1)).sum(0)
        return torch.stack([net(x) for _ in range(T)]).sum(0)
    x = 2 * torch.rand(6, 8)
    with torch.no_grad():
        forward(net, x)
    before = [net[1].v.clone(), net[3].v.clone()]
    callback = DiagnosticsCallback(lyapunov_every=1, forward=forward, batch_dim=0)
    callback._net = net
    callback._lyapunov((x, None))
    assert all(torch.equal(net[i].v, v) for i, v in zip((1, 3), before))


class _TwoOptimizers(DigitsSNN):
    """Manual optimization with two optimizers: global_step moves by 2 per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[1].parameters(), lr=0.01), torch.optim.SGD(self.net[3].parameters(), lr=0.01)]


def test_lyapunov_every_counts_optimizer_steps_with_two_optimizers(tmp_path):
    """Two optimizer steps per batch: every step index the estimate looked at was odd, so
    lyapunov_every=2 never estimated. Now once per 2 optimizer steps: 4 batches, 4 estimates."""
    from stablespike.integrations.lightning import DiagnosticsCallback
    train, _ = loaders(n_train=4 * BATCH)

    def forward(net, x):
        utils.reset(net)
        return torch.stack([net(x)[0] for _ in range(T)]).sum(0)
    callback = DiagnosticsCallback(every=2, module="net", lyapunov_every=2, forward=forward)
    trainer_for(tmp_path, callback, max_steps=8).fit(_TwoOptimizers(), train)  # 4 batches
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("diagnostics/lyapunov")]
    assert steps == [1, 3, 5, 7]


def test_bad_arguments_are_named():
    from stablespike.integrations.lightning import DiagnosticsCallback
    with pytest.raises(ValueError, match="every"):
        DiagnosticsCallback(every=0)
    with pytest.raises(ValueError, match="lyapunov_every"):
        DiagnosticsCallback(lyapunov_every=-1)
    with pytest.raises(TypeError, match="forward"):
        DiagnosticsCallback(forward=3)
    with pytest.raises(ValueError, match="batch_dim"):
        DiagnosticsCallback(batch_dim=1.5)
    for eps in (0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="lyap_eps"):
            DiagnosticsCallback(lyap_eps=eps)
    with pytest.raises(ValueError, match="module.*'network'"):  # no such attribute
        DiagnosticsCallback(module="network").on_fit_start(None, DigitsSNN())


def test_two_process_ddp_logs_the_rate_merged_over_both_ranks_once(tmp_path):
    # a process group of the suite's own (torchrun variables) must not leak into Lightning's
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "lightning_ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=HERE, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("firing_rate/1")]
    assert [int(r["step"]) for r in rows] == [0, 2]  # each logged step once
    # rank 0 loads inputs on which the unit fires at every step, rank 1 inputs on which it never does:
    # the merged rate is their mean, a hand count (see the worker)
    assert [float(r["firing_rate/1"]) for r in rows] == [0.5, 0.5]
    assert [float(r["dead_fraction/1"]) for r in rows] == [0.0, 0.0]  # a unit fires on rank 0
    # a logger without Lightning's rank-0 guard: the callback called it on rank 0 only
    calls = {rank: [json.loads(line) for line in open(tmp_path / f"calls_rank{rank}.jsonl")]
             if (tmp_path / f"calls_rank{rank}.jsonl").exists() else [] for rank in (0, 1)}
    assert [c["step"] for c in calls[0] if "firing_rate/1" in c] == [0, 2]
    assert not [c for c in calls[1] if any(k.startswith(("firing_rate/", "diagnostics/")) for k in c)]
    for epoch in (0, 1):  # 2 batches per rank and epoch: the epoch's report is merged too
        report = json.loads((tmp_path / "run" / "version_0" / f"diagnostics_epoch{epoch}.json").read_text())
        assert report["layers"]["1"]["firing_rate_mean"] == 0.5
