"""Seed 004 (spikingjelly's monitor tutorial) on the very spikingjelly network of the tutorial, with
spikingjelly's own monitors as the oracle: our records must equal theirs on the same forward."""
import pytest
import torch
from torch import nn

sj = pytest.importorskip("spikingjelly.activation_based", reason="make test installs spikingjelly")
from spikingjelly.activation_based import functional, layer, monitor, neuron, surrogate  # noqa: E402

import stablespike as ss  # noqa: E402


def tutorial_net():
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 4), neuron.IFNode(), layer.Linear(4, 2), neuron.IFNode())
    for p in net.parameters():  # "to avoid no spikes, we set all weights to be positive"
        p.data.abs_()
    functional.set_step_mode(net, "m")
    return net


def assert_same_records(ours, theirs):
    assert len(ours.records) == len(theirs.records) > 0
    for a, b in zip(ours.records, theirs.records):
        assert torch.equal(a, b.detach())


def test_output_monitor_matches_spikingjelly():
    net = tutorial_net()
    x_seq = torch.rand([4, 1, 8])
    ours, theirs = ss.OutputMonitor(net, neuron.IFNode), monitor.OutputMonitor(net, neuron.IFNode)
    default = ss.OutputMonitor(net)  # instance left out: every spiking neuron
    with torch.no_grad():
        net(x_seq)
    assert_same_records(ours, theirs)
    assert_same_records(default, theirs)
    assert ours.monitored_layers == theirs.monitored_layers == ["1", "3"]
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours["1"][0], theirs["1"][0])
    assert ours[0].abs().sum() > 0  # the tutorial net spikes
    ours.clear_recorded_data()
    assert ours.records == [] and ours["1"] == []


def test_firing_rate_function_and_disable_enable_match_spikingjelly():
    net = tutorial_net()
    x_seq = torch.rand([4, 1, 8])

    def cal_firing_rate(s_seq):
        return s_seq.flatten(1).mean(1)

    ours = ss.OutputMonitor(net, neuron.IFNode, cal_firing_rate)
    theirs = monitor.OutputMonitor(net, neuron.IFNode, cal_firing_rate)
    with torch.no_grad():
        ours.disable()
        theirs.disable()
        net(x_seq)
        functional.reset_net(net)
        assert ours.records == [] == theirs.records and not ours.is_enable()
        ours.enable()
        theirs.enable()
        net(x_seq)
        functional.reset_net(net)
    assert_same_records(ours, theirs)


def test_attribute_and_input_monitors_match_spikingjelly():
    net = tutorial_net()
    for m in net.modules():
        if isinstance(m, neuron.IFNode):
            m.store_v_seq = True
    x_seq = torch.rand([4, 1, 8])
    pairs = [
        (ss.AttributeMonitor("v_seq", False, net, neuron.IFNode),
         monitor.AttributeMonitor("v_seq", pre_forward=False, net=net, instance=neuron.IFNode)),
        (ss.InputMonitor(net, neuron.IFNode), monitor.InputMonitor(net, neuron.IFNode)),
    ]
    with torch.no_grad():
        net(x_seq)
    for ours, theirs in pairs:
        assert_same_records(ours, theirs)


def test_grad_output_monitor_matches_spikingjelly():
    net = tutorial_net()
    x_seq = torch.rand([4, 1, 8])
    ours, theirs = ss.GradOutputMonitor(net, neuron.IFNode), monitor.GradOutputMonitor(net, neuron.IFNode)
    net(x_seq).sum().backward()
    assert_same_records(ours, theirs)
    assert torch.equal(ours[0], torch.ones_like(ours[0]))  # last layer first: d sum / d s = 1


def test_grad_input_monitor_on_the_deep_tutorial_net_matches_spikingjelly():
    torch.manual_seed(0)
    net = []
    for _ in range(10):
        net += [layer.Linear(8, 8), neuron.IFNode()]
    net = nn.Sequential(*net)
    functional.set_step_mode(net, "m")
    x_seq = torch.rand([4, 1, 8])
    ours = ss.GradInputMonitor(net, neuron.IFNode, function_on_grad_input=torch.norm)
    theirs = monitor.GradInputMonitor(net, neuron.IFNode, function_on_grad_input=torch.norm)
    norms = []
    for alpha in [0.5, 4]:
        for m in net.modules():
            if isinstance(m, surrogate.Sigmoid):
                m.alpha = alpha
        net(x_seq).sum().backward()
        functional.reset_net(net)
        assert_same_records(ours, theirs)
        norms.append([float(r) for r in ours.records])
        ours.records.clear()
        theirs.records.clear()
    assert len(norms[0]) == 10
    assert norms[1][-1] > norms[0][-1]  # a sharper surrogate lets more gradient reach layer 1


def test_firing_rate_monitor_on_multistep_spikingjelly():
    net = tutorial_net()
    x_seq = torch.rand([6, 3, 8])
    raw = monitor.OutputMonitor(net, neuron.IFNode)
    rates = ss.FiringRateMonitor(net)
    with torch.no_grad():
        net(x_seq)
    for name, spikes in zip(["1", "3"], raw.records):  # (T, B, N): average over T and B
        assert torch.allclose(rates.rates()[name].float(), spikes.mean(dim=(0, 1)))
