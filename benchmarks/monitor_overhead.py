"""Cost of monitoring a forward pass, and memory growth, measured side by side.

Network: a 784-512-512-512-10 LIF MLP, T=25, B=64 (REFERENCES.md section 4), forward only.

* stablespike (snnTorch neurons, one hook call per time step): no monitor, ``FiringRateMonitor``
  (streaming), ``OutputMonitor`` (raw records, detached);
* spikingjelly, when installed: the equivalent multi-step LIF net, no monitor and its own
  ``OutputMonitor``; each framework's ratio is against its own unmonitored forward.

Timing: all variants interleaved in one process after a warm-up, medians. Memory: growth of the
resident set over repeated forwards (streaming: 200 forwards; raw records: 5, reported per forward),
with and without autograd.

    python benchmarks/monitor_overhead.py [--reps 21]
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
from torch import nn

import stablespike as ss
from _timing import time_interleaved

T, B, DIMS = 25, 64, [512, 512, 512]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ours():
    torch.manual_seed(0)
    return ss.SpikingMLP(784, DIMS, 10).eval()


def spikingjelly_net():
    try:
        from spikingjelly.activation_based import functional, layer, neuron
    except Exception:
        return None, None
    torch.manual_seed(0)
    mods, d = [], 784
    for h in DIMS:  # decay_input=False, soft reset: v <- v + (x - v)/tau style LIF of the same sizes
        mods += [layer.Linear(d, h), neuron.LIFNode(tau=10.0, v_reset=None)]
        d = h
    net = nn.Sequential(*mods, layer.Linear(d, 10))
    functional.set_step_mode(net, "m")
    return net, functional


def growth(make_monitor, forward, n: int, grad: bool) -> float:
    """Resident-set growth in MB over ``n`` forwards with the monitor attached (after 3 warm-ups)."""
    mon = make_monitor()
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            forward()
        gc.collect()
        before = rss_mb()
        for _ in range(n):
            forward()
        gc.collect()
        after = rss_mb()
    mon.close()
    del mon
    gc.collect()
    return after - before


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    x_bf = torch.rand(B, T, 784)
    x_tf = x_bf.transpose(0, 1).contiguous()
    model = ours()
    sj_net, functional = spikingjelly_net()

    # one copy of the model per variant, monitors attached for the whole run (same weights)
    plain, streamed, recorded = ours(), ours(), ours()
    rate_monitor = ss.FiringRateMonitor(streamed)
    raw_monitor = ss.OutputMonitor(recorded)

    def forward(net):
        def run():
            with torch.no_grad():
                net(x_bf)
            raw_monitor.clear_recorded_data()  # keep memory flat; records are dropped, not timed apart
        return run

    variants = {
        "ours: none": forward(plain),
        "ours: FiringRateMonitor": forward(streamed),
        "ours: OutputMonitor (raw)": forward(recorded),
    }
    if sj_net is not None:
        from spikingjelly.activation_based import monitor as sj_monitor, neuron
        sj_plain, _ = spikingjelly_net()
        sj_monitored = sj_monitor.OutputMonitor(sj_net, neuron.LIFNode)

        def sj_forward(net, mon=None):
            def run():
                with torch.no_grad():
                    net(x_tf)
                functional.reset_net(net)
                if mon is not None:
                    mon.clear_recorded_data()
            return run
        variants["spikingjelly: none"] = sj_forward(sj_plain)
        variants["spikingjelly: OutputMonitor"] = sj_forward(sj_net, sj_monitored)
    med = time_interleaved(variants, args.warmup, args.reps)
    print(f"forward of a 784-{'-'.join(map(str, DIMS))}-10 LIF MLP, T={T}, B={B}, no grad; "
          f"median of {args.reps} interleaved reps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in med.items():
        base = med["spikingjelly: none"] if name.startswith("spikingjelly") else med["ours: none"]
        print(f"  {name:<30} {1e3 * t:8.1f} ms   {t / base:5.3f}x")

    rate_monitor.close()
    raw_monitor.close()
    if sj_net is not None:
        sj_monitored.close()
    print("memory growth (resident set):")
    stream = growth(lambda: ss.FiringRateMonitor(model), lambda: model(x_bf), 200, grad=False)
    stream_g = growth(lambda: ss.FiringRateMonitor(model), lambda: model(x_bf), 200, grad=True)
    print(f"  ours: FiringRateMonitor, 200 forwards      {stream:7.1f} MB (no grad) {stream_g:7.1f} MB (grad)")
    raw = growth(lambda: ss.OutputMonitor(model), lambda: model(x_bf), 5, grad=False) / 5
    raw_g = growth(lambda: ss.OutputMonitor(model), lambda: model(x_bf), 5, grad=True) / 5
    print(f"  ours: OutputMonitor (detached), per forward {raw:7.1f} MB (no grad) {raw_g:7.1f} MB (grad)")
    if sj_net is not None:
        def sj_forward():
            sj_net(x_tf)
            functional.reset_net(sj_net)
        make = lambda: sj_monitor.OutputMonitor(sj_net, neuron.LIFNode)  # noqa: E731
        sj = growth(make, sj_forward, 5, grad=False) / 5
        sj_g = growth(make, sj_forward, 5, grad=True) / 5
        print(f"  spikingjelly: OutputMonitor, per forward   {sj:7.1f} MB (no grad) {sj_g:7.1f} MB (grad)")


if __name__ == "__main__":
    main()
