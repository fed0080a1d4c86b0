"""Small models written the way each framework's own tutorials write them.

These are "user" models for tests of estimators that run an arbitrary model
through ``forward(model, x)``: nothing here is adapted to stablespike. Each
builder takes keyword arguments (sizes, decay/time constants, threshold, seed)
and returns a ready ``nn.Module``; every model is small enough for CPU tests.

Where each model keeps its neuron state (checked against the installed sources):

* snnTorch ``snn.Leaky`` / ``snn.RSynaptic`` (tutorial 5, RSynaptic):
  the state is passed as an argument and returned (``spk, mem = lif(cur, mem)``,
  ``spk, syn, mem = lif(cur, spk, syn, mem)``), and is *also* mirrored in
  non-persistent buffers ``mem`` (``spk``, ``syn``, ``mem`` for RSynaptic)
  that keep the last value (with its graph) after the call. ``init_leaky()`` /
  ``init_rsynaptic()`` (aliases of ``reset_mem()``) zero those buffers.
* snnTorch ``init_hidden=True`` (tutorial 7): state only in the buffer ``mem``;
  ``utils.reset(net)`` zeroes and detaches it (for every Leaky ever created, via
  the class-level ``SpikingNeuron.instances`` list).
* SpikingJelly ``neuron.LIFNode``: memory ``v`` in ``node._memories["v"]``
  (read as ``node.v``); float ``0.0`` after ``functional.reset_net(net)``,
  the final-step voltage tensor after a multi-step call; ``node.v_seq`` holds
  the (T, ...) voltage trace only when ``store_v_seq=True``.
* Norse ``LIFCell``: no module state; ``LIFFeedForwardState(v, i)`` is passed
  in and returned (``z, s = cell(inp, s)``); ``s=None`` means the initial
  state ``v = v_leak`` (0-dim, ``requires_grad=True``), ``i = 0``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Seed parameter initialisation without disturbing the caller's global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gain(model: nn.Module, weight_gain: float) -> nn.Module:
    """Multiply every weight matrix/kernel (dim > 1) by ``weight_gain`` after the
    framework's default init, as a user picking a larger init would. Default init
    with these tiny widths leaves the deeper layers nearly silent; a gain of
    about 4 makes the snnTorch and norse outputs spike on ``torch.rand`` inputs
    (the SpikingJelly CSNN's BatchNorm cancels the gain on its conv kernels,
    only its final Linear is effectively scaled)."""
    if weight_gain != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("weight") and p.dim() > 1:
                    p.mul_(weight_gain)
    return model


# --------------------------------------------------------------------------- #
# snnTorch
# --------------------------------------------------------------------------- #

def snntorch_tutorial5(num_inputs: int = 20, num_hidden: int = 30, num_outputs: int = 5,
                       beta: float = 0.9, threshold: float = 1.0, num_steps: int = 10,
                       spike_grad=None, weight_gain: float = 1.0, seed: Optional[int] = 0) -> nn.Module:
    """snnTorch tutorial 5 network: static input ``x`` (B, num_inputs).

    Returns ``(spk2_rec, mem2_rec)``, each (num_steps, B, num_outputs). Default
    surrogate (ATan) unless ``spike_grad`` is given.
    """
    import snntorch as snn

    kw = {} if spike_grad is None else {"spike_grad": spike_grad}

    # Define Network
    class Net(nn.Module):
        def __init__(self):
            super().__init__()

            # Initialize layers
            self.fc1 = nn.Linear(num_inputs, num_hidden)
            self.lif1 = snn.Leaky(beta=beta, threshold=threshold, **kw)
            self.fc2 = nn.Linear(num_hidden, num_outputs)
            self.lif2 = snn.Leaky(beta=beta, threshold=threshold, **kw)
            self.num_steps = num_steps

        def forward(self, x):

            # Initialize hidden states at t=0
            mem1 = self.lif1.init_leaky()
            mem2 = self.lif2.init_leaky()

            # Record the final layer
            spk2_rec = []
            mem2_rec = []

            for step in range(self.num_steps):
                cur1 = self.fc1(x)
                spk1, mem1 = self.lif1(cur1, mem1)
                cur2 = self.fc2(spk1)
                spk2, mem2 = self.lif2(cur2, mem2)
                spk2_rec.append(spk2)
                mem2_rec.append(mem2)

            return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)

    with _seeded(seed):
        return _gain(Net(), weight_gain)


def snntorch_tutorial7_conv(beta: float = 0.5, threshold: float = 1.0, num_steps: int = 5,
                            in_size: int = 12, weight_gain: float = 1.0, seed: Optional[int] = 0) -> nn.Module:
    """snnTorch tutorial 7 convolutional ``nn.Sequential`` (``init_hidden=True``).

    One step: ``spk_out, mem_out = net(data[step])`` with ``data[step]``
    (B, 1, in_size, in_size); both outputs (B, 10). Run it over time with
    :func:`snntorch_tutorial7_forward`. ``num_steps`` is only recorded on the
    returned module (``net.num_steps``) for convenience.
    """
    import snntorch as snn
    from snntorch import surrogate

    s1 = (in_size - 2) // 2          # conv 3x3 (no padding), maxpool 2
    s2 = (s1 - 2) // 2
    if s2 < 1:
        raise ValueError(f"in_size={in_size} too small for two conv3+pool2 stages")

    # neuron and simulation parameters
    spike_grad = surrogate.fast_sigmoid(slope=25)

    with _seeded(seed):
        #  Initialize Network
        net = nn.Sequential(nn.Conv2d(1, 4, 3),
                            nn.MaxPool2d(2),
                            snn.Leaky(beta=beta, threshold=threshold, spike_grad=spike_grad,
                                      init_hidden=True),
                            nn.Conv2d(4, 8, 3),
                            nn.MaxPool2d(2),
                            snn.Leaky(beta=beta, threshold=threshold, spike_grad=spike_grad,
                                      init_hidden=True),
                            nn.Flatten(),
                            nn.Linear(8 * s2 * s2, 10),
                            snn.Leaky(beta=beta, threshold=threshold, spike_grad=spike_grad,
                                      init_hidden=True, output=True)
                            )
    net.num_steps = num_steps
    return _gain(net, weight_gain)


def snntorch_tutorial7_forward(num_steps: int) -> Callable[[nn.Module, torch.Tensor], tuple]:
    """The tutorial's ``forward_pass(net, num_steps, data)`` as ``f(net, data)``.

    ``data`` is time-first (T, B, 1, H, W) with T >= num_steps; returns
    ``(spk_rec, mem_rec)``, each (num_steps, B, 10).
    """
    from snntorch import utils

    def forward_pass(net, data):
        mem_rec = []
        spk_rec = []
        utils.reset(net)  # resets hidden states for all LIF neurons in net

        for step in range(num_steps):
            spk_out, mem_out = net(data[step])
            spk_rec.append(spk_out)
            mem_rec.append(mem_out)

        return torch.stack(spk_rec), torch.stack(mem_rec)

    return forward_pass


def snntorch_rsynaptic(num_inputs: int = 10, num_hidden: int = 16, num_outputs: int = 4,
                       alpha: float = 0.9, beta: float = 0.8, threshold: float = 1.0,
                       spike_grad=None, weight_gain: float = 1.0, seed: Optional[int] = 0) -> nn.Module:
    """Two ``snn.RSynaptic`` layers (all-to-all recurrent ``nn.Linear``).

    Input ``x`` time-first (T, B, num_inputs); returns ``(spk2_rec, mem2_rec)``,
    each (T, B, num_outputs).
    """
    import snntorch as snn

    kw = {} if spike_grad is None else {"spike_grad": spike_grad}

    # Define Network
    class Net(nn.Module):
        def __init__(self):
            super().__init__()

            # initialize layers
            self.fc1 = nn.Linear(num_inputs, num_hidden)
            self.lif1 = snn.RSynaptic(alpha=alpha, beta=beta, linear_features=num_hidden,
                                      threshold=threshold, **kw)
            self.fc2 = nn.Linear(num_hidden, num_outputs)
            self.lif2 = snn.RSynaptic(alpha=alpha, beta=beta, linear_features=num_outputs,
                                      threshold=threshold, **kw)

        def forward(self, x):
            # Initialize hidden states at t=0
            spk1, syn1, mem1 = self.lif1.init_rsynaptic()
            spk2, syn2, mem2 = self.lif2.init_rsynaptic()

            # Record output layer spikes and membrane
            spk2_rec = []
            mem2_rec = []

            # time-loop
            for step in range(x.size(0)):
                cur1 = self.fc1(x[step])
                spk1, syn1, mem1 = self.lif1(cur1, spk1, syn1, mem1)
                cur2 = self.fc2(spk1)
                spk2, syn2, mem2 = self.lif2(cur2, spk2, syn2, mem2)

                spk2_rec.append(spk2)
                mem2_rec.append(mem2)

            # convert lists to tensors
            spk2_rec = torch.stack(spk2_rec)
            mem2_rec = torch.stack(mem2_rec)

            return spk2_rec, mem2_rec

    with _seeded(seed):
        return _gain(Net(), weight_gain)


# --------------------------------------------------------------------------- #
# SpikingJelly (activation_based)
# --------------------------------------------------------------------------- #

def spikingjelly_csnn(channels: int = 4, tau: float = 2.0, T: int = 4, in_size: int = 12,
                      v_threshold: float = 1.0, weight_gain: float = 1.0, seed: Optional[int] = 0) -> nn.Module:
    """Fashion-MNIST CSNN of the SpikingJelly tutorial, multi-step (``step_mode='m'``).

    Input (T, B, 1, in_size, in_size) -> output spikes (T, B, 10). ``T`` is
    only recorded on the module (``net.T``); the network runs on whatever T the
    input has. Like the tutorial, users call ``functional.reset_net(net)``
    after each batch; :func:`spikingjelly_forward` does not.
    """
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    if in_size % 4:
        raise ValueError("in_size must be divisible by 4 (two 2x2 max-pools)")
    tau = float(tau)                 # LIFNode asserts a float tau > 1
    v_threshold = float(v_threshold)  # and a float v_threshold
    s = in_size // 4

    with _seeded(seed):
        net = nn.Sequential(
            layer.Conv2d(1, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.LIFNode(tau=tau, v_threshold=v_threshold, surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Conv2d(channels, 2 * channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(2 * channels),
            neuron.LIFNode(tau=tau, v_threshold=v_threshold, surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Flatten(),
            layer.Linear(2 * channels * s * s, 10, bias=False),
            neuron.LIFNode(tau=tau, v_threshold=v_threshold, surrogate_function=surrogate.ATan()),
        )

    functional.set_step_mode(net, step_mode="m")
    net.T = T
    return _gain(net, weight_gain)


def spikingjelly_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` for x (T, B, 1, H, W) -> spikes (T, B, 10); no reset inside.

    The tutorial takes ``net(x).mean(0)`` as firing rate and calls
    ``functional.reset_net(net)`` after each batch; callers of this function
    do that reset themselves (the LIF voltages otherwise carry over).
    """
    return net(x)


# --------------------------------------------------------------------------- #
# Norse
# --------------------------------------------------------------------------- #

def norse_lifcell_loop(num_inputs: int = 10, num_hidden: int = 16, num_outputs: int = 4,
                       tau_mem_inv: float = 1.0 / 1e-2, tau_syn_inv: float = 1.0 / 5e-3,
                       v_th: float = 1.0, method: str = "super", alpha: float = 100.0,
                       dt: float = 0.001, readout: bool = False,
                       weight_gain: float = 1.0, seed: Optional[int] = 0) -> nn.Module:
    """Norse ``LIFCell`` network with an explicit time loop (norse defaults).

    Input ``x`` (T, B, num_inputs). With ``readout=False`` it returns the
    ``cell2`` spikes (T, B, num_outputs). With ``readout=True`` ``cell2`` is a
    hidden layer and a ``LILinearCell`` readout (as in ``norse.torch.models.conv``)
    gives voltages (T, B, num_outputs).
    """
    import norse.torch as norse
    from norse.torch import LIFParameters

    def params():
        return LIFParameters(tau_syn_inv=torch.as_tensor(tau_syn_inv),
                             tau_mem_inv=torch.as_tensor(tau_mem_inv),
                             v_th=torch.as_tensor(v_th),
                             method=method, alpha=torch.as_tensor(alpha))

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(num_inputs, num_hidden)
            self.cell1 = norse.LIFCell(p=params(), dt=dt)
            self.fc2 = nn.Linear(num_hidden, num_hidden if readout else num_outputs)
            self.cell2 = norse.LIFCell(p=params(), dt=dt)
            if readout:
                self.out = norse.LILinearCell(num_hidden, num_outputs, dt=dt)

        def forward(self, x):
            seq_length = x.shape[0]
            s1 = s2 = so = None
            outputs = []
            for ts in range(seq_length):
                z, s1 = self.cell1(self.fc1(x[ts]), s1)
                z, s2 = self.cell2(self.fc2(z), s2)
                if readout:
                    z, so = self.out(z, so)
                outputs.append(z)
            return torch.stack(outputs)

    with _seeded(seed):
        return _gain(Network(), weight_gain)


if __name__ == "__main__":
    import time
    import warnings

    warnings.simplefilter("ignore")
    B = 3

    def timed(name, fn, *args):
        fn(*args)  # warm-up
        t0 = time.perf_counter()
        out = fn(*args)
        dt_ms = (time.perf_counter() - t0) * 1e3
        outs = out if isinstance(out, tuple) else (out,)
        print(f"{name:32s} {[tuple(o.shape) for o in outs]}  {dt_ms:.1f} ms  "
              f"mean(out[0]) {outs[0].float().mean().item():.3f}")
        return out

    from spikingjelly.activation_based import functional

    def sj(net, x):
        out = spikingjelly_forward(net, x)
        functional.reset_net(net)  # the tutorial resets after each batch
        return out

    for g in (1.0, 4.0):
        print(f"-- weight_gain={g}")
        m = snntorch_tutorial5(weight_gain=g)
        timed("snntorch_tutorial5", m, torch.rand(B, 20))

        net = snntorch_tutorial7_conv(weight_gain=g)
        f = snntorch_tutorial7_forward(net.num_steps)
        timed("snntorch_tutorial7_conv", f, net, torch.rand(5, B, 1, 12, 12) * 2)

        m = snntorch_rsynaptic(weight_gain=g)
        timed("snntorch_rsynaptic", m, torch.rand(8, B, 10))

        net = spikingjelly_csnn(weight_gain=g)
        timed("spikingjelly_csnn", sj, net, torch.rand(4, B, 1, 12, 12))

        m = norse_lifcell_loop(weight_gain=g)
        timed("norse_lifcell_loop", m, torch.rand(8, B, 10) * 20)
        m = norse_lifcell_loop(readout=True, weight_gain=g)
        timed("norse_lifcell_loop(readout)", m, torch.rand(8, B, 10) * 20)
