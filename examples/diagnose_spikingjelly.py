"""Diagnose your own spikingjelly model, with spikingjelly's monitor API.

    python examples/diagnose_spikingjelly.py          # 20 training batches, ~10 s
    python examples/diagnose_spikingjelly.py --fast   # 2 batches (the test suite)

The network is written as spikingjelly's tutorials write a convolutional SNN: multi-step
(``step_mode="m"``) ``layer.Conv2d`` + ``layer.BatchNorm2d`` + ``neuron.LIFNode``, the static
image repeated over T steps, ``functional.reset_net`` after each batch; here on scikit-learn's
bundled 8x8 digits (no download). The stablespike lines are marked ``# stablespike``:

* ``stablespike.OutputMonitor(net, neuron.LIFNode)`` takes spikingjelly's arguments and records
  what ``spikingjelly.activation_based.monitor.OutputMonitor`` records — the script runs both on
  the same forward and checks that every record is equal;
* ``stablespike.SpikeProfiler().attach(net)`` profiles every LIF node during training.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from spikingjelly.activation_based import functional, layer, monitor, neuron, surrogate

import stablespike  # stablespike


def build_net(channels: int = 16) -> nn.Sequential:
    """A spikingjelly CSNN for (T, B, 1, 8, 8) inputs -> (T, B, 10) output spikes."""
    def lif():
        return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)
    net = nn.Sequential(
        layer.Conv2d(1, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels), lif(),
        layer.MaxPool2d(2),
        layer.Conv2d(channels, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels), lif(),
        layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(channels * 4, 10), lif())
    functional.set_step_mode(net, "m")
    return net


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="training batches")
    parser.add_argument("--T", type=int, default=4, help="time steps per image")
    parser.add_argument("--fast", action="store_true", help="2 batches (the test suite)")
    args = parser.parse_args(argv)
    batches = 2 if args.fast else args.batches

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    net = build_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    # 1. the same records as spikingjelly's own monitor, on one forward
    ours = stablespike.OutputMonitor(net, neuron.LIFNode)  # stablespike
    theirs = monitor.OutputMonitor(net, neuron.LIFNode)
    with torch.no_grad():
        net(x[:32].unsqueeze(0).repeat(args.T, 1, 1, 1, 1))
    functional.reset_net(net)
    same = len(ours.records) == len(theirs.records) > 0 and all(
        torch.equal(a, b) for a, b in zip(ours.records, theirs.records))
    print(f"monitored layers {ours.monitored_layers}; {len(ours.records)} records, "
          f"equal to spikingjelly's OutputMonitor: {same}")
    ours.remove_hooks()
    theirs.remove_hooks()

    # 2. the profiler over the user's own training loop
    profiler = stablespike.SpikeProfiler().attach(net)  # stablespike
    for step in range(batches):
        idx = torch.randint(0, len(x), (64,))
        x_seq = x[idx].unsqueeze(0).repeat(args.T, 1, 1, 1, 1)  # (T, B, 1, 8, 8)
        loss = nn.functional.cross_entropy(net(x_seq).mean(0), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        functional.reset_net(net)
    print(profiler.report().summary())  # stablespike
    profiler.detach()  # stablespike
    if not same:
        raise SystemExit("the records differ from spikingjelly's")


if __name__ == "__main__":
    main()
