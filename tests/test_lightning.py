"""The Lightning callback on a user's LightningModule: per-layer rates reach the trainer's logger."""
import csv

import pytest
import torch
from torch import nn

import stablespike as ss

pl = pytest.importorskip("lightning.pytorch")


class AlwaysOn(nn.Module):  # a registered neuron type of the user's: fires at every step
    def forward(self, x):
        return x - x.detach() + 1.0


class NeverOn(nn.Module):
    def forward(self, x):
        return x * 0.0


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), AlwaysOn(), nn.Linear(3, 2), NeverOn(), nn.Linear(2, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        return {"loss": loss, "lyapunov": torch.tensor(-0.1)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_callback_logs_per_layer_rates_through_the_trainers_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from stablespike.integrations.lightning import StableSpikeCallback

    for kind in (AlwaysOn, NeverOn):
        ss.register_neuron(kind)
    try:
        data = torch.utils.data.TensorDataset(torch.rand(16, 4), torch.randint(0, 2, (16,)))
        callback = StableSpikeCallback(every=2)
        trainer = pl.Trainer(max_steps=4, logger=CSVLogger(str(tmp_path), name="run"), callbacks=[callback],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", log_every_n_steps=1)
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        for kind in (AlwaysOn, NeverOn):
            ss.neurons.DEFAULT_REGISTRY.unregister(kind)
    assert [row["step"] for row in callback.history] == [0, 2]
    assert [row["layers"]["net.1"]["firing_rate"] for row in callback.history] == [1.0, 1.0]  # hand count
    assert [row["layers"]["net.3"]["firing_rate"] for row in callback.history] == [0.0, 0.0]
    assert callback.history[0]["lyapunov"] == pytest.approx(-0.1)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("firing_rate/net.1")]
    assert [float(r["firing_rate/net.1"]) for r in logged] == [1.0, 1.0]
    assert all(len(m._forward_hooks) == 0 for m in trainer.lightning_module.modules())  # detached
