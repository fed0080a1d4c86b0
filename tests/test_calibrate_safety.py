"""calibrate never leaves a model worse than it found it (issue: wrecked models).

Models are written the way snnTorch's and norse's tutorials write them (tests/user_models.py,
norse's SequentialState); every rate checked here is counted by hand from the model's own T-step
loop (its modules called step by step), never read from stablespike's monitors.
"""
import copy
import math
import re

import norse.torch as norse
import pytest
import snntorch as snn
import torch
from snntorch import utils
from spikingjelly.activation_based import functional, neuron
from torch import nn

import user_models as um
from stablespike import calibrate
from stablespike.init import MAX_SCALE


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- snnTorch RSynaptic

def _rsynaptic_rates(m, x, zero_fc2=False):
    """The tutorial's loop, by hand: spike counts of lif1 and lif2 / (T * B * N)."""
    with torch.no_grad():
        spk1, syn1, mem1 = m.lif1.init_rsynaptic()
        spk2, syn2, mem2 = m.lif2.init_rsynaptic()
        n1 = n2 = 0.0
        for x_t in x:
            spk1, syn1, mem1 = m.lif1(m.fc1(x_t), spk1, syn1, mem1)
            cur2 = m.fc2(spk1)
            spk2, syn2, mem2 = m.lif2(torch.zeros_like(cur2) if zero_fc2 else cur2, spk2, syn2, mem2)
            n1, n2 = n1 + float(spk1.sum()), n2 + float(spk2.sum())
    return n1 / (x.shape[0] * x.shape[1] * spk1.shape[1]), n2 / (x.shape[0] * x.shape[1] * spk2.shape[1])


def _rsynaptic(first_recurrent: bool):
    """RSynaptic + RSynaptic; without ``first_recurrent`` the first layer's recurrent connection
    starts at zero (so that only the second fires from its recurrence alone)."""
    m = um.snntorch_rsynaptic(num_inputs=6, weight_gain=4.0)
    if not first_recurrent:
        with torch.no_grad():
            m.lif1.recurrent.weight.zero_()
            m.lif1.recurrent.bias.zero_()
    return m, torch.rand(20, 8, 6, generator=torch.Generator().manual_seed(0))


def test_a_layer_firing_from_its_recurrence_alone_is_restored_with_the_reason():
    m, x = _rsynaptic(first_recurrent=False)
    idle = _rsynaptic_rates(m, x, zero_fc2=True)[1]
    assert idle > 0.12  # lif2 fires above the target with no input at all: no fc2 scale can fix it
    fc2 = _params(m.fc2)
    ratios = []  # fc2's weights relative to the found ones, at every forward calibrate runs
    m.fc2.register_forward_pre_hook(
        lambda mod, args: ratios.append(float(mod.weight.norm() / fc2["weight"].norm())))
    report = calibrate(m, x, target_rate=0.1, tolerance=0.02)
    assert _unchanged(m.fc2, fc2)  # exactly as found (today: x3.3e-24, the input disconnected)
    row = {r.layer: r for r in report.layers}
    assert row["lif2"].restored and not row["lif2"].converged and row["lif2"].scale == 1.0
    reason = report.left_alone["lif2"]
    assert "zero input" in reason and "recurrent" in reason and "left as found: lif2" in str(report)
    assert float(re.search(r"fires at ([0-9.]+)", reason).group(1)) == pytest.approx(idle, abs=1e-3)
    assert all(1 / MAX_SCALE * 0.999 <= r <= MAX_SCALE * 1.001 for r in ratios), (min(ratios), max(ratios))
    rate1, _ = _rsynaptic_rates(m, x)  # the layer it could fix, in the real loop
    assert row["lif1"].converged and abs(rate1 - 0.1) <= 0.02
    assert row["lif1"].rate_after == pytest.approx(rate1, abs=1e-6)


def test_a_network_where_no_layer_can_reach_the_target_is_left_exactly_as_found():
    m, x = _rsynaptic(first_recurrent=True)
    before = _params(m)
    report = calibrate(m, x, target_rate=0.1, tolerance=0.02)
    assert _unchanged(m, before)
    assert set(report.left_alone) == {"lif1", "lif2"}
    rate1, rate2 = _rsynaptic_rates(m, x)
    assert [r.rate_after for r in report.layers] == pytest.approx([rate1, rate2], abs=1e-6)


def test_a_silent_input_and_the_scale_bound_are_reasons_not_wrecks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(8, 8), snn.Leaky(beta=0.9, init_hidden=True))

    def forward(model, x):
        utils.reset(model)
        return [model(x_t) for x_t in x]

    before = _params(net[0])
    report = calibrate(net, torch.zeros(10, 4, 4), forward=forward)  # no input current at all
    assert _unchanged(net[0], before) and report.layers[0].scale == 1.0
    assert "input current is zero" in report.left_alone["1"]
    report = calibrate(net, torch.rand(10, 4, 4) * 0.01, max_scale=2.0, forward=forward)
    assert _unchanged(net[0], before) and report.layers[0].rate_after < 0.08
    assert "x2, the bound" in report.left_alone["1"]


def test_a_rate_that_jumps_over_the_target_is_a_reason_not_a_wreck():
    """One neuron, a constant current, 10 steps: the rate can only be a multiple of 1/10, so a
    target of 0.15 +- 0.02 lies between two reachable rates, 0.1 and 0.2 (counted by hand)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 1), snn.Leaky(beta=0.9, init_hidden=True))

    def forward(model, x):
        utils.reset(model)
        return [model(x_t) for x_t in x]

    before = _params(net)
    report = calibrate(net, torch.ones(10, 1, 1), target_rate=0.15, tolerance=0.02, forward=forward)
    assert _unchanged(net, before)
    reason = report.left_alone["1"]
    assert re.search(r"jumps from 0\.1 \(x[0-9.e+-]+\) to 0\.2 \(", reason), reason


# --------------------------------------------------------------------------- forwards not run over time

def _norse_net():
    torch.manual_seed(0)  # norse's tutorial model: SequentialState of Linear and LIFCell
    return norse.SequentialState(nn.Linear(10, 32), norse.LIFCell(), nn.Linear(32, 4), norse.LIFCell())


def _norse_rates(net, x):
    """The T-step loop by hand, each cell's state carried: spikes / (T * B * N) per cell."""
    s1 = s3 = None
    counts = [0.0, 0.0]
    with torch.no_grad():
        for x_t in x:
            z1, s1 = net[1](net[0](x_t), s1)
            z3, s3 = net[3](net[2](z1), s3)
            counts = [counts[0] + float(z1.sum()), counts[1] + float(z3.sum())]
    return counts[0] / z1.numel() / len(x), counts[1] / z3.numel() / len(x)


def _example(message):
    return re.search(r"`([^`]*(?:forward|def)[^`]*)`", message).group(1)


def test_norse_sequential_state_with_the_default_forward_asks_for_a_time_loop():
    net, x = _norse_net(), torch.rand(20, 8, 10)
    before = _params(net)
    with pytest.raises(ValueError, match=r"forward: model\(x\) calls neuron layer '1' \(LIFCell\) once") as err:
        calibrate(net, x)  # one step on a (T, B, D) batch: today the readout was scaled x3e23
    assert _unchanged(net, before)
    # the one-line loop the message gives runs the model over time, its state carried
    scope = {}
    exec(_example(str(err.value)), scope)
    report = calibrate(net, x, target_rate=0.1, tolerance=0.02, forward=scope["forward"])
    rates = _norse_rates(net, x)
    assert all(abs(r - 0.1) <= 0.02 for r in rates), rates
    assert [r.rate_after for r in report.layers] == pytest.approx(rates, abs=1e-6)


def _tutorial7():
    x = 2 * torch.rand(5, 4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return um.snntorch_tutorial7_conv(weight_gain=4.0), x


def _tutorial7_rates(net, x):
    """The tutorial's loop by hand (utils.reset, then T steps): rate of each Leaky."""
    counts = {2: 0.0, 5: 0.0, 8: 0.0}
    with torch.no_grad():
        utils.reset(net)
        for x_t in x:
            h = x_t
            for i, module in enumerate(net):
                h = module(h)
                if i in counts:
                    spk = h[0] if isinstance(h, tuple) else h
                    counts[i] += float(spk.sum()) / spk.numel() / len(x)
    return counts


def test_snntorch_tutorial7_with_the_default_one_step_forward_is_refused():
    net, x = _tutorial7()
    before = _params(net)
    with pytest.raises(ValueError, match=r"forward: model\(x\) calls neuron layer '2' \(Leaky\) once") as err:
        calibrate(net, x[0], target_rate=0.1, mode="threshold")  # today: "ok at 0.10"
    assert _unchanged(net, before)
    scope = {"utils": utils}
    exec(_example(str(err.value)), scope)
    report = calibrate(net, x, target_rate=0.1, mode="threshold", forward=scope["forward"])
    rates = _tutorial7_rates(net, x)  # the real T-step loop, after the change
    assert [r.rate_after for r in report.layers] == pytest.approx(list(rates.values()), abs=1e-6)
    assert all(abs(r - 0.1) <= 0.02 for r in rates.values()), rates


def test_a_forward_that_never_resets_the_state_is_refused_and_the_model_kept():
    net, x = _tutorial7()

    def no_reset(model, x):  # the tutorial's loop without utils.reset: state carried across calls
        return [model(x_t) for x_t in x]

    before = _params(net)  # thresholds are buffers of the Leaky modules: in the state dict
    with pytest.raises(ValueError, match="forward: two runs .* carries over"):
        calibrate(net, x, mode="threshold", forward=no_reset)
    assert _unchanged(net, before)


def test_a_carried_state_hidden_by_silence_at_the_start_is_caught_at_the_end():
    """Silent at first (both runs read 0), the missing reset shows once the layers fire: every
    layer is put back as found and the error raised."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16, bias=False), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(16, 16, bias=False), snn.Leaky(beta=0.9, init_hidden=True))

    def no_reset(model, x):
        return [model(x_t) for x_t in x]

    x = torch.rand(8, 8, 6) * 0.02
    with torch.no_grad():  # twice, by hand: not a spike, so the two runs cannot differ
        assert sum(float(net(x_t).sum()) for _ in range(2) for x_t in x) == 0
    before = _params(net)
    with pytest.raises(ValueError, match="forward: two runs .* carries over"):
        calibrate(net, x, forward=no_reset)
    assert _unchanged(net, before)


def test_an_interrupt_half_way_leaves_the_model_as_found():
    net, x = _tutorial7()
    forward, calls = um.snntorch_tutorial7_forward(5), []

    def interrupted(model, x):
        calls.append(1)
        if len(calls) == 6:  # during the second layer's search
            raise KeyboardInterrupt
        return forward(model, x)

    before = _params(net)
    with pytest.raises(KeyboardInterrupt):
        calibrate(net, x, mode="threshold", forward=interrupted)
    assert _unchanged(net, before)


def test_multi_step_models_run_with_one_call_are_accepted():
    """spikingjelly multi-step and norse sequence modules run T steps in one call: model(x) is fine."""
    torch.manual_seed(0)
    sj = nn.Sequential(nn.Linear(20, 64), neuron.LIFNode(tau=2.0, step_mode="m"),
                       nn.Linear(64, 64), neuron.LIFNode(tau=2.0, step_mode="m"))
    x = torch.rand(8, 32, 20) * 0.5
    assert all(r.converged for r in calibrate(sj, x, target_rate=0.1).layers)
    functional.reset_net(sj)  # the tutorial's reset, then one multi-step call: spikes (T, B, N)
    with torch.no_grad():
        h = sj[1](sj[0](x))
        out = sj[3](sj[2](h))
    assert abs(float(h.mean()) - 0.1) <= 0.02 and abs(float(out.mean()) - 0.1) <= 0.02

    torch.manual_seed(0)
    nr = norse.SequentialState(nn.Linear(10, 32), norse.LIF(), nn.Linear(32, 4), norse.LIF())
    x = torch.rand(20, 8, 10)
    assert all(r.converged for r in calibrate(nr, x, target_rate=0.1).layers)
    with torch.no_grad():
        z1, _ = nr[1](nr[0](x))
        z3, _ = nr[3](nr[2](z1))
    assert abs(float(z1.mean()) - 0.1) <= 0.02 and abs(float(z3.mean()) - 0.1) <= 0.02


# --------------------------------------------------------------------------- weights mode through pooling

def test_weights_mode_scales_the_conv_behind_max_pooling_in_tutorial7():
    net, x = _tutorial7()
    forward = um.snntorch_tutorial7_forward(5)
    found = {i: _params(net[i]) for i in (0, 3, 7)}
    report = calibrate(net, x, target_rate=0.1, mode="weights", forward=forward)
    rates = _tutorial7_rates(net, x)
    assert all(abs(r - 0.1) <= 0.02 for r in rates.values()), rates
    for row, i in zip(report.layers, (0, 3, 7)):  # Conv -> MaxPool -> Leaky: the conv was scaled
        for name, p in net[i].state_dict().items():
            assert torch.allclose(p, found[i][name] * row.scale, rtol=1e-6), (i, name)
    # a positive scale s on the weights before a subtractive-reset Leaky is a threshold / s:
    # threshold mode on a fresh copy must find the reciprocal scales and the same real-loop rates
    twin, _ = _tutorial7()
    by_threshold = calibrate(twin, x, target_rate=0.1, mode="threshold", forward=forward)
    assert [r.scale for r in by_threshold.layers] == pytest.approx([1 / r.scale for r in report.layers], rel=1e-5)
    assert list(_tutorial7_rates(twin, x).values()) == pytest.approx(list(rates.values()), abs=1e-3)


def test_weights_mode_passes_through_every_positively_homogeneous_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Dropout(0.3), nn.Identity(), nn.LeakyReLU(), snn.Leaky(beta=0.8, init_hidden=True))

    def forward(model, x):
        utils.reset(model)
        return [model(x_t) for x_t in x]

    x = torch.rand(6, 8, 1, 10, 10)
    conv = _params(net[0])
    report = calibrate(net, x, target_rate=0.15, tolerance=0.03, forward=forward)
    assert report.layers[0].converged
    assert torch.allclose(net[0].weight, conv["weight"] * report.layers[0].scale, rtol=1e-6)
    with torch.no_grad():
        utils.reset(net)
        rate = sum(float(net(x_t).mean()) for x_t in x) / len(x)
    assert abs(rate - 0.15) <= 0.03


def test_a_module_that_does_not_commute_with_a_scale_is_still_refused():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), snn.Leaky(beta=0.8, init_hidden=True))

    def forward(model, x):
        utils.reset(model)
        return [model(x_t) for x_t in x]

    with pytest.raises(ValueError, match="cannot tell which module feeds neuron layer '2'.*mode='threshold'"):
        calibrate(net, torch.rand(5, 3, 4), forward=forward)


# --------------------------------------------------------------------------- bad input

_NET = nn.Sequential(nn.Linear(4, 8), snn.Leaky(beta=0.9, init_hidden=True))


@pytest.mark.parametrize("kwargs, error, name", [
    ({"target_rate": 0.0}, ValueError, "target_rate"),
    ({"target_rate": 1.2}, ValueError, "target_rate"),
    ({"target_rate": math.nan}, ValueError, "target_rate"),
    ({"target_rate": "0.1"}, ValueError, "target_rate"),
    ({"target_rate": True}, ValueError, "target_rate"),
    ({"tolerance": 0.5}, ValueError, "tolerance"),
    ({"tolerance": -0.01}, ValueError, "tolerance"),
    ({"tolerance": math.nan}, ValueError, "tolerance"),
    ({"mode": "bias"}, ValueError, "mode"),
    ({"mode": None}, ValueError, "mode"),
    ({"max_evaluations": 1}, ValueError, "max_evaluations"),
    ({"max_evaluations": 10.0}, ValueError, "max_evaluations"),
    ({"max_scale": 1.0}, ValueError, "max_scale"),
    ({"max_scale": math.inf}, ValueError, "max_scale"),
    ({"forward": "model(x)"}, TypeError, "forward"),
    ({"x": torch.randint(0, 2, (5, 3, 4))}, TypeError, "x"),
    ({"x": [[0.5] * 4] * 3}, TypeError, "x"),
    ({"x": torch.zeros(0, 3, 4)}, ValueError, "x"),
    ({"x": torch.full((5, 3, 4), math.nan)}, ValueError, "x"),
    ({"model": "net"}, TypeError, "model"),
])
def test_bad_input_names_the_argument(kwargs, error, name):
    args = {"model": _NET, "x": torch.rand(5, 3, 4), **kwargs}
    model, x = args.pop("model"), args.pop("x")
    with pytest.raises(error, match=rf"^{name}: expected"):
        calibrate(model, x, **args)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"target_rate": 1.0}, ValueError, "target_rate"),
    ({"x": torch.ones(5, 3, 4, dtype=torch.int64)}, TypeError, "x"),
    ({"forward": 3}, TypeError, "forward"),
])
def test_fluctuation_init_bad_input_names_the_argument(kwargs, error, name):
    from stablespike import fluctuation_init
    args = {"x": torch.rand(5, 3, 4), **kwargs}
    with pytest.raises(error, match=rf"^{name}: expected"):
        fluctuation_init(_NET, args.pop("x"), **args)
