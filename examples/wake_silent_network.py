"""Wake a deep silent snnTorch network: calibrate it and widen its surrogate, then it learns.

    python examples/wake_silent_network.py            # depth 8, 3 epochs each way, ~10 s on 2 cores
    python examples/wake_silent_network.py --fast     # 4 batches each way (the test suite)

The network is an snnTorch MLP written as snnTorch's tutorials write it (``nn.Sequential`` of
``snn.Leaky`` with ``init_hidden=True``, ``utils.reset`` and a time loop), eight hidden layers
deep, on scikit-learn's bundled 8x8 digits (no download). It is trained twice, in the user's own
loop, from the same initial weights:

* as it is (the surrogate of snnTorch's tutorials, ``fast_sigmoid(slope=25)``): the profiler's
  verdict at initialization is silent deep layers, and the net stays near chance;
* cured (``# stablespike`` lines): ``calibrate`` rescales each layer's input weights, from the
  input, until every layer fires at 0.1 on one batch, and the surrogate is widened to slope 1 so
  the gradient reaches the first layers.
"""
from __future__ import annotations

import argparse

import snntorch as snn
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from snntorch import surrogate, utils

import stablespike  # stablespike

NUM_STEPS = 8


def build_net(depth: int, slope: float, hidden: int = 64, beta: float = 0.9) -> nn.Sequential:
    """``depth`` hidden layers of ``snn.Leaky``; (B, 64) -> (B, 10) spikes per step."""
    grad = surrogate.fast_sigmoid(slope=slope)
    layers, width = [], 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True)]
        width = hidden
    layers += [nn.Linear(width, 10), snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True, output=True)]
    return nn.Sequential(*layers)


def forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The user's time loop: ``x`` (B, 64) repeated over NUM_STEPS -> output spikes (T, B, 10)."""
    utils.reset(net)
    return torch.stack([net(x)[0] for _ in range(NUM_STEPS)])


def train(net, x, y, x_test, y_test, epochs: int, max_batches: int, seed: int) -> float:
    """The user's own loop: Adam, cross-entropy on spike counts; returns the test accuracy."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64)[:max_batches]:
            loss = nn.functional.cross_entropy(forward(net, x[idx]).sum(0), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((forward(net, x_test).sum(0).argmax(1) == y_test).float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8, help="hidden layers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fast", action="store_true", help="4 batches each way (the test suite)")
    args = parser.parse_args(argv)
    epochs, max_batches = (1, 4) if args.fast else (args.epochs, 10 ** 9)

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = split[:1400], split[1400:]

    torch.manual_seed(0)
    vanilla = build_net(args.depth, slope=25)
    cured = build_net(args.depth, slope=1)  # stablespike: a wide surrogate ...
    cured.load_state_dict(vanilla.state_dict())  # ... on the very same initial weights

    profiler = stablespike.SpikeProfiler().attach(vanilla)  # stablespike: the verdict at init
    with torch.no_grad():
        forward(vanilla, x[train_idx[:256]])
    report = profiler.report()
    profiler.detach()
    silent = [name for name, ls in report.layer_stats.items() if ls.firing_rates.max() == 0]
    print(f"at initialization: health {report.health_score:.0f}/100, silent layers: {', '.join(silent) or 'none'}")

    calibration = stablespike.calibrate(cured, x[train_idx[:256]], target_rate=0.1,  # stablespike
                                        forward=forward)
    print(calibration)

    acc_vanilla = train(vanilla, x[train_idx], y[train_idx], x[test_idx], y[test_idx], epochs, max_batches, 0)
    acc_cured = train(cured, x[train_idx], y[train_idx], x[test_idx], y[test_idx], epochs, max_batches, 0)
    print(f"test accuracy after {epochs} epoch(s): as it is {acc_vanilla:.3f}, "
          f"calibrated + slope 1 {acc_cured:.3f} (chance 0.100)")


if __name__ == "__main__":
    main()
