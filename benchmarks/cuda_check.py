"""The twin engine on CUDA: known values on a user's snnTorch model, and the regularized training
step of the library's MLP over the plain one (interleaved, after a warm-up, medians of ratios).

    PYTHONPATH=src python benchmarks/cuda_check.py [--reps 20]

Prints one line per figure. Needs a CUDA device and snnTorch.
"""
import argparse
import math
import statistics
import sys
import time

import torch

sys.path.insert(0, "tests")
from user_models import snntorch_tutorial5  # noqa: E402

from stablespike import SpikingMLP, finite_difference_lyapunov, tangent_spectrum  # noqa: E402
from stablespike.data import rate  # noqa: E402


def known_values(dev):
    """Below threshold a snnTorch Leaky net's exponent is ln(beta) = ln 0.9 = -0.1054."""
    net = snntorch_tutorial5(threshold=1e9).to(dev)
    x = torch.rand(8, 20, device=dev)
    fd = finite_difference_lyapunov(net, x, batch_dim=0, eps=1e-2)
    ts = tangent_spectrum(net, x, batch_dim=0, k=2)
    print(f"snnTorch below threshold on {dev}: finite difference {float(fd):+.4f}, tangent "
          f"{[round(float(v), 4) for v in ts.exponents]}, expected {math.log(0.9):+.4f}")


def timed_step(model, opt, x, y, **lyap):
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    logits, lam, _ = model(x, compute_lyapunov=bool(lyap), **lyap)
    loss = torch.nn.functional.cross_entropy(logits, y)
    if lam is not None:
        loss = loss + 0.1 * (lam - (-0.1)) ** 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - t0


def overhead(dev, reps):
    model = SpikingMLP(784, [256] * 4, 10).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(64, 25, 784, device=dev), torch.randint(0, 10, (64,), device=dev)
    arms = {"plain": {}, "fraction 0.125": {"lyap_fraction": 0.125, "lyap_eps": 1e-2},
            "full batch": {"lyap_fraction": 1.0, "lyap_eps": 1e-2}}
    for kw in arms.values():  # warm-up
        for _ in range(3):
            timed_step(model, opt, x, y, **kw)
    times = {name: [] for name in arms}
    for r in range(reps):
        for name in list(arms)[r % 3:] + list(arms)[:r % 3]:  # rotating order
            times[name].append(timed_step(model, opt, x, y, **arms[name]))
    plain = times["plain"]
    for name in ("fraction 0.125", "full batch"):
        ratio = statistics.median(t / p for t, p in zip(times[name], plain))
        print(f"MLP 784-256x4-10, T=25, B=64 on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}: {name} "
              f"{ratio:.2f}x the plain step ({statistics.median(plain) * 1e3:.1f} ms plain, {reps} reps)")


def encoder_on_cuda(dev):
    x = torch.rand(4, 10, device=dev)
    g_cpu, g_dev = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    same = torch.equal(rate(x, 5, generator=g_dev).cpu(), rate(x.cpu(), 5, generator=g_cpu))
    print(f"rate encoder, CPU generator on CUDA input: same spikes as on the CPU: {same}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    known_values(dev)
    encoder_on_cuda(dev)
    overhead(dev, args.reps)
