"""Data-driven initialization: every layer fires at the target on held-out data."""
import copy

import pytest
import snntorch as snn
import torch
from torch import nn

from stablespike import FiringRateMonitor, SpikingMLP, SpikingVGG, calibrate, fluctuation_init


def rates(model, x, forward=None):
    with FiringRateMonitor(model) as monitor, torch.no_grad():
        (forward or (lambda m, v: m(v)))(model, x)
    return {row["layer"]: row["mean"] for row in monitor.table()}


def test_deep_mlp_fires_at_the_target_on_held_out_data():
    torch.manual_seed(0)
    model = SpikingMLP(64, [128] * 12, 10)
    calib, held_out = torch.rand(64, 8, 64), torch.rand(64, 8, 64)
    assert rates(model, held_out)["lifs.11"] == 0.0  # silent by default: the problem
    report = calibrate(model, calib, target_rate=0.1, tolerance=0.02)
    assert all(r.converged for r in report.layers) and "lifs.11" in str(report)
    for name, rate in rates(model, held_out).items():
        assert abs(rate - 0.1) <= 0.02, (name, rate)
    assert model.training  # the mode it was found in


def test_vgg_with_batch_norm_fires_at_the_target_and_keeps_its_statistics():
    torch.manual_seed(1)
    model = SpikingVGG(1, 10, base_channels=8, num_stages=3, blocks_per_stage=2, T=4, input_size=16).train()
    bn_before = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    calibrate(model, torch.rand(32, 1, 16, 16), target_rate=0.1, tolerance=0.02)
    bn_after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(bn_before, bn_after))
    for name, rate in rates(model, torch.rand(32, 1, 16, 16)).items():
        assert abs(rate - 0.1) <= 0.02, (name, rate)


def test_calibration_is_deterministic():
    torch.manual_seed(2)
    a = SpikingMLP(16, [32] * 4, 2)
    b = copy.deepcopy(a)
    x = torch.rand(16, 6, 16)
    calibrate(a, x)
    calibrate(b, x)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_snntorch_sequential_with_a_time_loop_and_threshold_mode():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 32), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(32, 32), snn.Leaky(beta=0.9, init_hidden=True))

    def forward(model, x):  # x: (T, B, 10)
        for m in model.modules():
            if isinstance(m, snn.SpikingNeuron):
                m.reset_mem()
        for x_t in x:
            model(x_t)

    x = torch.rand(10, 16, 10)
    for mode in ("weights", "threshold"):
        model = copy.deepcopy(net)
        report = calibrate(model, x, target_rate=0.2, tolerance=0.03, mode=mode, forward=forward)
        assert all(r.converged for r in report.layers), str(report)
        for rate in rates(model, torch.rand(10, 16, 10), forward).values():
            assert abs(rate - 0.2) <= 0.03
    assert float(net[1].threshold) == 1.0  # copies were calibrated, not the original


def test_fluctuation_init_wakes_a_silent_deep_network():
    torch.manual_seed(4)
    model = SpikingMLP(64, [128] * 8, 10)
    x = torch.rand(32, 8, 64)
    report = fluctuation_init(model, x, target_rate=0.1)
    assert all(r.rate_before == 0 for r in report.layers[4:])
    assert all(r.rate_after > 0.005 for r in report.layers)  # approximate, but every layer fires
    assert str(report).splitlines()[0] == "calibration (fluctuation) to rate 0.1"  # no "+- nan"


@pytest.mark.parametrize("kwargs, match", [
    ({"target_rate": 0.0}, "target_rate"), ({"target_rate": 1.2}, "target_rate"),
    ({"tolerance": 0.5}, "tolerance"), ({"mode": "bias"}, "mode"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(SpikingMLP(4, [8], 2), torch.rand(2, 3, 4), **kwargs)


def test_bad_models_and_batches():
    with pytest.raises(ValueError, match="^model: Linear has no spiking-neuron modules"):
        calibrate(nn.Linear(4, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="^x: expected a non-empty tensor"):
        calibrate(SpikingMLP(4, [8], 2), torch.zeros(0, 3, 4))


def test_threshold_balancer_moves_rates_toward_the_target():
    from stablespike.init import ThresholdBalancer
    torch.manual_seed(5)
    model = SpikingMLP(32, [64, 64, 64], 2)
    x = torch.rand(32, 8, 32)
    start = rates(model, x)
    balancer = ThresholdBalancer(model, target_rate=0.1, rate_gain=5.0)
    for _ in range(150):
        with torch.no_grad():
            model(x)
        balancer.step()
    balancer.close()
    end = rates(model, x)
    assert start["lifs.2"] < 0.02  # a nearly silent deep layer at the start
    for name, rate in end.items():
        assert abs(rate - 0.1) < 0.01, (name, rate)
    with pytest.raises(ValueError, match="target_rate"):
        ThresholdBalancer(model, target_rate=1.0)


def test_threshold_balancer_as_a_training_callback():
    from stablespike.data import load_dataset
    from stablespike.init import ThresholdBalancer
    from stablespike.train import TrainConfig, fit
    torch.manual_seed(6)
    model = SpikingMLP(64, [64] * 6, 10)
    data = load_dataset("digits")
    before = rates(model, data.x_test[:64].flatten(1).unsqueeze(1).expand(64, 8, 64))
    fit(model, data, TrainConfig(epochs=1, batch_size=64, T=8, progress=False),
        callbacks=[ThresholdBalancer(model, target_rate=0.1, rate_gain=2.0)])
    after = rates(model, data.x_test[:64].flatten(1).unsqueeze(1).expand(64, 8, 64))
    assert before["lifs.5"] < 0.01 < after["lifs.5"]  # the deepest layer woke up during training
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
