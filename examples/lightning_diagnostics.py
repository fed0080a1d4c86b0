"""stablespike's diagnostics in a PyTorch Lightning fit of an snnTorch model, seen in TensorBoard.

    python examples/lightning_diagnostics.py              # 3 epochs on digits, ~15 s on a CPU
    tensorboard --logdir lightning_logs                   # then open http://localhost:6006
    python examples/lightning_diagnostics.py --fast       # 4 steps (the test suite)

The LightningModule is what an snnTorch user writes: the network of snnTorch's tutorials
(``nn.Sequential`` of ``snn.Leaky`` with ``init_hidden=True``), a time loop with
``utils.reset``, cross-entropy on spike counts; here four hidden layers deep on scikit-learn's
bundled 8x8 digits (no download). The one stablespike line is the callback (``# stablespike``).

With TensorBoard installed the logs go to TensorBoard (scalars ``firing_rate/<layer>``,
``dead_fraction/<layer>``, ``grad_norm/<layer>``, ``diagnostics/*`` and the histograms
``rate_histogram/<layer>``), else to a CSV file. After each epoch the callback logs its verdict
and findings (Python ``logging``, shown here by ``logging.basicConfig``) and writes the profiler's
report beside the logs as ``diagnostics_epoch<N>.json`` and ``.html``. At the end the script
prints where the logs and reports went and the last epoch's verdict.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os

import lightning.pytorch as pl
import snntorch as snn
import torch
import torch.nn as nn
from snntorch import surrogate, utils

from stablespike.data import load_dataset
from stablespike.integrations.lightning import DiagnosticsCallback  # stablespike

NUM_STEPS = 8


class DigitsSNN(pl.LightningModule):
    def __init__(self, depth: int = 4, hidden: int = 64, lr: float = 2e-3):
        super().__init__()
        grad, layers, width = surrogate.fast_sigmoid(slope=25), [nn.Flatten()], 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), snn.Leaky(beta=0.9, spike_grad=grad, init_hidden=True)]
            width = hidden
        layers += [nn.Linear(width, 10), snn.Leaky(beta=0.9, spike_grad=grad, init_hidden=True, output=True)]
        self.net, self.lr = nn.Sequential(*layers), lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, 8, 8) repeated over NUM_STEPS -> spike counts (B, 10)."""
        utils.reset(self.net)
        return torch.stack([self.net(x)[0] for _ in range(NUM_STEPS)]).sum(0)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def logger_for(root: str):
    try:
        import tensorboard  # noqa: F401
        return pl.loggers.TensorBoardLogger(root, name="digits_snn")
    except ImportError:
        return pl.loggers.CSVLogger(root, name="digits_snn")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--root", default="lightning_logs", help="where the logs go")
    parser.add_argument("--fast", action="store_true", help="4 training steps (the test suite)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the callback's verdicts

    torch.manual_seed(0)
    data = load_dataset("digits")
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                        batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=256)
    logger = logger_for(args.root)
    diagnostics = DiagnosticsCallback(every=2 if args.fast else 10, module="net")  # stablespike
    trainer = pl.Trainer(max_epochs=1 if args.fast else args.epochs, max_steps=4 if args.fast else -1,
                         logger=logger, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
                         callbacks=[diagnostics])
    trainer.fit(DigitsSNN(), train, val)

    print(f"logs ({type(logger).__name__}): {logger.log_dir}")
    for path in sorted(glob.glob(os.path.join(logger.log_dir, "diagnostics_epoch*"))):
        print(f"report: {path}")
    report = diagnostics.epoch_report  # the last epoch's, as in its report files
    print(f"verdict of the last epoch: health {report.health_score:.0f}/100, "
          f"{len(report.pathologies)} finding(s) (logged above, and in its report)")
    if isinstance(logger, pl.loggers.TensorBoardLogger):
        print(f"view: tensorboard --logdir {args.root}")


if __name__ == "__main__":
    main()
