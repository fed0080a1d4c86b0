"""Your own snnTorch model trained by ``stablespike.fit`` with the Lyapunov penalty, on one
process or data-parallel under ``torchrun``: the script is the same.

    python examples/torchrun_training.py                                    # one process
    torchrun --standalone --nproc_per_node 2 examples/torchrun_training.py  # 2 ranks (gloo on CPU)
    torchrun --standalone --nproc_per_node 4 examples/torchrun_training.py --device cuda
    python examples/torchrun_training.py --fast                             # 1 epoch (the test suite)

Under torchrun each rank takes ``batch_size / world size`` samples of every step, DDP averages
the gradients, the exponent in the loss is the mean over all ranks' samples, and only rank 0
writes ``metrics.jsonl``, the checkpoint and the TensorBoard files into ``--out_dir``. Running the
command again resumes from the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os

import snntorch as snn
import torch
import torch.nn as nn
from snntorch import surrogate, utils

import stablespike
from stablespike.train import TrainConfig, fit

NUM_STEPS = 8


def build_net(beta: float = 0.9) -> nn.Sequential:
    """snnTorch's tutorial style: ``nn.Sequential`` of ``snn.Leaky`` with ``init_hidden=True``."""
    grad = surrogate.fast_sigmoid(slope=1)  # a wide surrogate: every layer gets a gradient
    return nn.Sequential(nn.Flatten(),
                         nn.Linear(64, 128), snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True),
                         nn.Linear(128, 128), snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True),
                         nn.Linear(128, 10), snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True, output=True))


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The user's time loop: a batch ``x`` (B, 1, 8, 8) -> logits (B, 10), the output spike counts."""
    utils.reset(net)
    return torch.stack([net(x)[0] for _ in range(NUM_STEPS)]).sum(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="runs/torchrun_example")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank on cuda:LOCAL_RANK)")
    parser.add_argument("--fast", action="store_true", help="1 epoch on 256 images (the test suite)")
    args = parser.parse_args(argv)

    data = stablespike.data.load_dataset("digits")  # bundled with scikit-learn: no download
    if args.fast:
        data = data.subset(train=256, test=128)
    config = TrainConfig(epochs=1 if args.fast else args.epochs, batch_size=64, lr=2e-3,
                         lyapunov=True, lyap_eps=1e-2, lyap_fraction=0.25,  # the penalty
                         device=args.device, progress=False)
    torch.manual_seed(0)  # every rank builds the same initial model
    result = fit(build_net(), data, config, out_dir=args.out_dir, forward=forward)
    if int(os.environ.get("RANK", "0")) == 0:
        for m in result.history:
            print(json.dumps({"epoch": m.epoch, "train_loss": round(m.train_loss, 4),
                              "lyapunov": round(m.lyapunov, 4), "test_acc": round(m.test_acc, 4)}))
        print(f"{result.status}: {len(result.history)} epoch(s), world size "
              f"{os.environ.get('WORLD_SIZE', '1')}; files in {args.out_dir}")


if __name__ == "__main__":
    main()
