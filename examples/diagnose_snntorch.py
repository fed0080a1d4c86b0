"""Diagnose your own snnTorch model: which layers fire, which are silent, where the gradient dies.

    python examples/diagnose_snntorch.py             # 30 training batches of a 6-layer net, ~10 s
    python examples/diagnose_snntorch.py --fast      # 3 batches (the test suite)

The network is written as snnTorch's tutorial 5 writes it: ``snn.Leaky`` layers whose membranes
the user's own ``forward`` carries through an explicit time loop and whose output spikes it
records — here six hidden layers deep, on scikit-learn's bundled 8x8 digits (no download).
The stablespike lines are marked ``# stablespike``: attach the profiler before training, train as
usual, print its report (and write the HTML version).

The script also counts the spikes itself, from the spike records its own forward returns, and
prints them beside the profiler's rates: the two columns must agree (the test suite checks it).
"""
from __future__ import annotations

import argparse

import snntorch as snn
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import stablespike  # stablespike


class Net(nn.Module):
    """snnTorch tutorial 5's network, ``depth`` hidden layers deep."""

    def __init__(self, depth: int = 6, hidden: int = 64, beta: float = 0.9):
        super().__init__()
        sizes = [64] + [hidden] * depth
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.lifs = nn.ModuleList(snn.Leaky(beta=beta) for _ in range(depth))
        self.fc_out = nn.Linear(hidden, 10)
        self.lif_out = snn.Leaky(beta=beta)

    def forward(self, x: torch.Tensor, num_steps: int = 10):
        """``x`` (B, 64) -> output spikes (T, B, 10) and every hidden layer's spikes (T, B, hidden)."""
        mems = [lif.init_leaky() for lif in self.lifs]
        mem_out = self.lif_out.init_leaky()
        out_rec, hidden_rec = [], [[] for _ in self.lifs]
        for _ in range(num_steps):
            h = x
            for i, (fc, lif) in enumerate(zip(self.fcs, self.lifs)):
                h, mems[i] = lif(fc(h), mems[i])
                hidden_rec[i].append(h)
            spk, mem_out = self.lif_out(self.fc_out(h), mem_out)
            out_rec.append(spk)
        return torch.stack(out_rec), [torch.stack(r) for r in hidden_rec]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="training batches")
    parser.add_argument("--fast", action="store_true", help="3 batches (the test suite)")
    parser.add_argument("--html", default="diagnose_snntorch.html", help="where the HTML report goes")
    args = parser.parse_args(argv)
    batches = 3 if args.fast else args.batches

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)

    profiler = stablespike.SpikeProfiler().attach(net)  # stablespike: every snn.Leaky, by hooks
    spike_sums = torch.zeros(len(net.lifs) + 1, dtype=torch.float64)  # our own count, per layer
    spike_counts = torch.zeros(len(net.lifs) + 1, dtype=torch.float64)
    for step in range(batches):  # the user's own training loop, unchanged
        idx = torch.randint(0, len(x), (64,))
        out, hidden = net(x[idx])
        loss = nn.functional.cross_entropy(out.sum(0), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for i, spikes in enumerate(hidden + [out]):
            spike_sums[i] += spikes.detach().double().sum()
            spike_counts[i] += spikes.numel()

    report = profiler.report()  # stablespike
    print(report.summary())  # stablespike: per-layer table, findings and fixes
    report.to_html(args.html)  # stablespike: the same with histograms, for a browser
    profiler.detach()  # stablespike

    print("\nfiring rate per layer: the profiler's against a count of the forward's own spike records")
    names = [f"lifs.{i}" for i in range(len(net.lifs))] + ["lif_out"]
    for i, name in enumerate(names):
        ours = float(report.layer_stats[name].firing_rates.mean())
        print(f"check {name:8s} profiler {ours:.6f}  hand count {float(spike_sums[i] / spike_counts[i]):.6f}")
    print(f"health score {report.health_score:.0f}/100; HTML report: {args.html}")


if __name__ == "__main__":
    main()
