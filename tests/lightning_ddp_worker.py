"""A 2-process DDP (gloo, CPU) Lightning fit with the DiagnosticsCallback; run by
tests/test_lightning.py as ``python lightning_ddp_worker.py OUT_DIR`` (Lightning's "ddp" strategy
starts the second rank by running this script again).

The network is one unit that fires whenever its input is positive (a registered neuron type of
the user's), fed through a fixed identity weight. Each rank loads its own share of the data
(``train_dataloader`` reads the rank): rank 0 only +1 inputs, on which the unit fires at every
step (rate 1), rank 1 only -1 inputs (rate 0). Merged over the ranks, the rate is 0.5.

Beside the CSVLogger, a ``RankLog`` writes every ``log_metrics`` call it gets on its own rank to
``calls_rank<R>.jsonl``: Lightning's own loggers write on rank 0 only whoever calls them, this one
shows whether the callback logged from rank 1 too.
"""
import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

import stablespike as ss
from stablespike.integrations.lightning import DiagnosticsCallback


class Step(nn.Module):
    """Spikes where the input is positive; a straight-through gradient."""

    def forward(self, x):
        return (x > 0).float() + x - x.detach()


class RankLog(Logger):
    """A logger without Lightning's rank-0 guard: one JSON line per call, in a file per rank."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    @property
    def name(self) -> str:
        return "rank_log"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        path = os.path.join(self.out_dir, f"calls_rank{int(os.environ.get('LOCAL_RANK', 0))}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        gate = nn.Linear(1, 1)
        with torch.no_grad():
            gate.weight.fill_(1.0)
            gate.bias.zero_()
        gate.requires_grad_(False)
        self.net = nn.Sequential(gate, Step(), nn.Linear(1, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        sign = 1.0 if self.global_rank == 0 else -1.0
        data = torch.utils.data.TensorDataset(torch.full((4, 1), sign), torch.tensor([0, 1, 0, 1]))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out_dir: str) -> None:
    ss.register_neuron(Step)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp",
                         logger=[CSVLogger(out_dir, name="run"), RankLog(out_dir)],
                         callbacks=[DiagnosticsCallback(every=2, module="net")],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, use_distributed_sampler=False)
    trainer.fit(Module())


if __name__ == "__main__":
    main(sys.argv[1])
