"""Getting started: diagnose and regularize your own snnTorch model in a few lines.

    python examples/quickstart.py

A two-layer snnTorch network written as snnTorch's tutorials write it (``nn.Sequential`` of
``snn.Leaky`` with ``init_hidden=True``, ``utils.reset`` and a time loop), one batch of random
images. Three stablespike lines: attach the profiler, estimate the finite-size Lyapunov exponent
through your own time loop (its ``outputs`` are your forward's, so the task loss needs no second
forward pass), print the profiler's report after ``backward``.
"""
import torch, torch.nn as nn, snntorch as snn
from snntorch import utils
import stablespike as ss

torch.manual_seed(0)
net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), snn.Leaky(beta=0.9, init_hidden=True),
                    nn.Linear(256, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
def forward(net, x):                                  # your time loop: (B, 1, 28, 28) -> (T, B, 10)
    utils.reset(net)
    return torch.stack([net(x)[0] for _ in range(25)])

profiler = ss.SpikeProfiler().attach(net)             # every snnTorch neuron, through hooks
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
res = ss.finite_difference_lyapunov(net, x, forward=forward, batch_dim=0, eps=1e-2)
loss = nn.functional.cross_entropy(res.outputs.sum(0), y) + 0.3 * (res.exponent + 0.1) ** 2
loss.backward()                                       # task loss + Lyapunov penalty, one forward
print(profiler.report().summary())                    # per-layer rates, findings, fixes
print(f"finite-size exponent {res.exponent.item():+.4f} per step, spike flips in "
      f"{100 * res.flip_fraction:.1f}% of steps")
