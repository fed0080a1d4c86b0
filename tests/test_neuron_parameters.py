"""Thresholds and membrane decays read and set through the framework adapters (neurons.py), and
threshold calibration on spikingjelly and norse networks that rely on them."""
import math
import warnings

import pytest
import snntorch as snn
import torch
from torch import nn

import stablespike as ss
from stablespike.neurons import NeuronRegistry, decay_of, scale_threshold, threshold_of

warnings.filterwarnings("ignore", category=UserWarning)
neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
norse = pytest.importorskip("norse.torch")


def test_snntorch_threshold_is_scaled_in_place_and_beta_is_the_decay():
    lif = snn.Leaky(beta=0.8, threshold=1.5)
    buffer = lif.threshold
    assert threshold_of(lif) == pytest.approx(1.5) and decay_of(lif) == pytest.approx(0.8)
    assert scale_threshold(lif, 2.0) == pytest.approx(3.0)
    assert lif.threshold is buffer and float(buffer) == pytest.approx(3.0)  # same tensor: DDP, optimizers
    assert scale_threshold(lif, 100.0, bounds=(0.0, 10.0)) == pytest.approx(10.0)


@pytest.mark.parametrize("node, decay", [
    (lambda: neuron.LIFNode(tau=4.0), 0.75),  # v += (x - v) / tau: keeps 1 - 1/tau
    (lambda: neuron.IFNode(), 1.0),  # no leak
    (lambda: neuron.ParametricLIFNode(init_tau=2.0), 0.5),  # 1/tau = sigmoid(w)
], ids=["LIF", "IF", "ParametricLIF"])
def test_spikingjelly_decays_and_thresholds(node, decay):
    n = node()
    assert decay_of(n) == pytest.approx(decay, abs=1e-6)
    assert threshold_of(n) == pytest.approx(1.0)
    scale_threshold(n, 0.5)
    assert n.v_threshold == pytest.approx(0.5)


def test_spikingjelly_lif_decay_matches_its_own_dynamics():
    n = neuron.LIFNode(tau=4.0, v_threshold=1e9, decay_input=True)
    n(torch.ones(1, 1))  # v = 1/tau
    v1 = float(n.v)
    n(torch.zeros(1, 1))  # no input: v keeps decay * v
    assert float(n.v) / v1 == pytest.approx(decay_of(n))


def test_norse_threshold_is_replaced_not_shared_and_decay_follows_dt():
    a, b = norse.LIFCell(), norse.LIFCell()
    assert decay_of(a) == pytest.approx(1 - 0.001 * 100.0)
    scale_threshold(a, 3.0)
    assert threshold_of(a) == pytest.approx(3.0) and threshold_of(b) == pytest.approx(1.0)


def test_registered_neuron_parameters_and_clear_errors():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = 0.4

        def forward(self, x):
            return (x > self.theta).float()

    registry = NeuronRegistry()
    registry.register(Custom, threshold="theta", decay=lambda m: 0.6)
    c = Custom()
    assert threshold_of(c, registry) == pytest.approx(0.4) and decay_of(c, registry) == 0.6
    scale_threshold(c, 2.0, registry=registry)
    assert c.theta == pytest.approx(0.8)
    bare = NeuronRegistry()
    bare.register(Custom)
    with pytest.raises(ValueError, match="Custom exposes no firing threshold.*threshold="):
        threshold_of(c, bare)
    with pytest.raises(ValueError, match="Custom exposes no membrane decay"):
        decay_of(c, bare)
    with pytest.raises(ValueError, match="Linear is not a known spiking neuron"):
        threshold_of(nn.Linear(2, 2))


def _rate(model, x, forward):
    with ss.FiringRateMonitor(model) as monitor, torch.no_grad():
        forward(model, x)
    return {row["layer"]: row["mean"] for row in monitor.table()}


def test_threshold_calibration_of_a_spikingjelly_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), neuron.LIFNode(tau=2.0, step_mode="m"),
                        nn.Linear(64, 64), neuron.LIFNode(tau=2.0, step_mode="m"))

    def forward(model, x):  # (T, B, D), multi-step
        out = model(x)
        for m in model.modules():
            if isinstance(m, neuron.BaseNode):
                m.reset()
        return out

    x = torch.rand(8, 32, 20) * 0.5
    report = ss.calibrate(net, x, target_rate=0.1, mode="threshold", forward=forward)
    rates = _rate(net, x, forward)
    assert all(abs(r - 0.1) <= 0.02 for r in rates.values()), (rates, str(report))
    assert all(m.v_threshold != 1.0 for m in net.modules() if isinstance(m, neuron.BaseNode))


def test_fluctuation_init_reads_a_norse_decay():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(20, 64), norse.LIFCell()
            self.fc2, self.lif2 = nn.Linear(64, 64), norse.LIFCell()

        def forward(self, x):  # (T, B, D)
            s1 = s2 = None
            out = []
            for x_t in x:
                z1, s1 = self.lif1(self.fc1(x_t), s1)
                z2, s2 = self.lif2(self.fc2(z1), s2)
                out.append(z2)
            return torch.stack(out)

    net = Net()
    x = torch.rand(40, 16, 20)
    with torch.no_grad():  # the first layer's current, before any scaling: its mean and std
        current = net.fc1(x).double()
    m, s = float(current.mean()), float(current.std())
    beta = 1 - 0.001 * 100.0  # norse LIFCell: dt * tau_mem_inv per step
    z = math.sqrt(2) * float(torch.erfinv(torch.tensor(0.8)))  # Phi^-1(0.9)
    expected = 1.0 / (m / (1 - beta) + z * s / math.sqrt(1 - beta ** 2))  # threshold 1
    report = ss.fluctuation_init(net, x, target_rate=0.1)
    assert report.layers[0].scale == pytest.approx(expected, rel=1e-6)  # it read beta = 0.9
    assert all(row.rate_after > 0 for row in report.layers), str(report)
