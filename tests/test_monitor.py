"""Monitors on snnTorch (init_hidden True/False, output=True), norse and stablespike's own models;
hook lifetime; detaching; bad input."""
import gc

import pytest
import snntorch as snn
import torch
from torch import nn

import stablespike as ss


def snntorch_net(output=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(16, 4), snn.Leaky(beta=0.9, init_hidden=True, output=output))
    for p in net.parameters():
        p.data.abs_()
    return net


def reset(net):
    for m in net.modules():
        if isinstance(m, snn.SpikingNeuron):
            m.reset_mem()


def run_manual(net, xs):
    """The oracle: step the layers by hand and keep what each neuron returns."""
    reset(net)
    spikes, mems = {"1": [], "3": []}, {"1": [], "3": []}
    with torch.no_grad():
        for x in xs:
            h = x
            for name, module in net.named_children():
                out = module(h)
                if isinstance(module, snn.SpikingNeuron):
                    spk = out[0] if isinstance(out, tuple) else out
                    spikes[name].append(spk.clone())
                    mems[name].append(module.mem.clone())
                    h = spk
                else:
                    h = out
    reset(net)
    return spikes, mems


def run(net, xs):
    with torch.no_grad():
        for x in xs:
            net(x)


@pytest.mark.parametrize("output", [False, True], ids=["init_hidden", "init_hidden+output"])
def test_seed004_walkthrough_on_snntorch(output):
    net = snntorch_net(output)
    xs = [torch.rand(2, 8) * 2 for _ in range(5)]
    spikes, mems = run_manual(net, xs)
    mon = ss.OutputMonitor(net, snn.Leaky)
    volt = ss.AttributeMonitor("mem", False, net)
    inp = ss.InputMonitor(net)
    run(net, xs)
    assert mon.monitored_layers == ["1", "3"]
    for name in ("1", "3"):
        assert all(torch.equal(a, b) for a, b in zip(mon[name], spikes[name]))
        assert all(torch.equal(a, b) for a, b in zip(volt[name], mems[name]))
    assert len(mon.records) == 10 and torch.equal(mon[0], spikes["1"][0])
    assert torch.cat(mon["1"]).sum() > 0
    assert torch.allclose(inp["1"][0], net[0](xs[0]))  # the input current of the first neuron
    mon.clear_recorded_data()
    assert mon.records == [] and mon["3"] == []
    mon.disable()
    run(net, xs)
    assert mon.records == []
    mon.enable()
    run(net, xs)
    assert len(mon.records) == 10


def test_pre_forward_attribute_monitor_records_the_state_before_the_step():
    net = snntorch_net()
    xs = [torch.rand(2, 8) * 2 for _ in range(3)]
    _, mems = run_manual(net, xs)
    before = ss.AttributeMonitor("mem", True, net, snn.Leaky)  # snnTorch's port raises TypeError here
    run(net, xs)
    assert torch.equal(before["1"][1], mems["1"][0])  # before step 2 = after step 1


def test_gradient_monitors_on_snntorch():
    net = snntorch_net()
    grads_out = ss.GradOutputMonitor(net)
    grads_in = ss.GradInputMonitor(net, function_on_grad_input=torch.norm)
    reset(net)
    total = sum(net(torch.rand(2, 8) * 2).sum() for _ in range(3))
    total.backward()
    assert len(grads_out.records) == 6 and len(grads_in.records) == 6
    last_layer = grads_out["3"]
    assert all(torch.equal(g, torch.ones(2, 4)) for g in last_layer)  # d sum / d spikes
    assert all(r.dim() == 0 for r in grads_in.records)


def test_stablespike_mlp_records_match_its_own_state_recordings():
    # init_hidden=False neurons, called as lif(current, mem) -> (spk, mem)
    torch.manual_seed(1)
    model = ss.SpikingMLP(10, [16, 12], 3, threshold=0.5).eval()
    x = torch.rand(4, 6, 10) * 2
    out, mem = ss.OutputMonitor(model), ss.MembraneMonitor(model)
    _, _, rec = model(x, record_states=True)
    for i, name in enumerate(["lifs.0", "lifs.1"]):
        assert torch.equal(torch.stack(out[name], dim=1), rec["layer_spikes"][i])
        v = rec["layer_membranes"][i].double()
        stats = mem.compute()[name]
        assert torch.allclose(stats["mean"], v.mean(dim=(0, 1)))
        assert torch.allclose(stats["std"], v.std(dim=(0, 1), unbiased=False))
        assert torch.equal(stats["max"], v.amax(dim=(0, 1)))


def test_lyapunov_twin_rows_are_not_recorded():
    torch.manual_seed(2)
    model = ss.SpikingMLP(10, [16], 3, threshold=0.5)
    x = torch.rand(4, 6, 10) * 2
    out, grads = ss.OutputMonitor(model), ss.GradOutputMonitor(model)
    rates = ss.FiringRateMonitor(model)
    logits, lam, rec = model(x, compute_lyapunov=True, record_states=True)
    (logits.sum() + lam).backward()
    assert {r.shape for r in out.records} == {(4, 16)} == {g.shape for g in grads.records}
    assert torch.allclose(rates.rates()["lifs.0"].float(), rec["spikes"].mean(dim=(0, 1)))


def test_norse_lif_cell_and_sequence():
    norse = pytest.importorskip("norse.torch", reason="make test installs norse")
    torch.manual_seed(3)
    cell_net = nn.Sequential(nn.Linear(5, 7), norse.LIFCell())
    seq = norse.LIF()
    out_cell, mem_cell = ss.OutputMonitor(cell_net), ss.MembraneMonitor(cell_net)
    rates = ss.FiringRateMonitor(seq)
    x = torch.rand(2, 5) * 5
    with torch.no_grad():
        z, state = cell_net(x)
        zs, _ = seq(torch.rand(6, 3, 7) * 5)
    assert out_cell.monitored_layers == ["1"] and torch.equal(out_cell[0], z)
    assert torch.allclose(mem_cell.compute()["1"]["mean"], state.v.double().mean(0))
    assert torch.allclose(rates.rates()[""].float(), zs.mean(dim=(0, 1)))  # (T, B, N) averaged


def test_registered_custom_neuron():
    class Heaviside(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = None

        def forward(self, x):
            self.v = x
            return (x > 0.5).float()

    net = nn.Sequential(nn.Identity(), Heaviside())
    with pytest.raises(ValueError, match="register_neuron"):
        ss.OutputMonitor(net)
    ss.register_neuron(Heaviside)
    try:
        rates, volt = ss.FiringRateMonitor(net), ss.MembraneMonitor(net)
        net(torch.tensor([[0.2, 0.9], [0.7, 0.1]]))
        assert rates.rates()["1"].tolist() == [0.5, 0.5]
        assert volt.compute()["1"]["max"].tolist() == pytest.approx([0.7, 0.9])
    finally:
        ss.neurons.DEFAULT_REGISTRY.unregister(Heaviside)


def hook_count(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in net.modules())


@pytest.mark.parametrize("cls", [ss.OutputMonitor, ss.InputMonitor, ss.GradOutputMonitor,
                                 ss.GradInputMonitor, ss.FiringRateMonitor, ss.GradNormMonitor])
def test_hooks_are_removed_in_every_way(cls):
    net = snntorch_net()
    mon = cls(net)
    assert hook_count(net) > 0
    mon.remove_hooks()
    assert hook_count(net) == 0
    with cls(net):
        assert hook_count(net) > 0
    assert hook_count(net) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with cls(net):
            raise RuntimeError("boom")
    assert hook_count(net) == 0
    mon = cls(net)
    del mon
    gc.collect()
    assert hook_count(net) == 0


def test_records_are_detached_unless_asked():
    net = snntorch_net(output=True)
    plain, kept = ss.InputMonitor(net), ss.InputMonitor(net, keep_graph=True)
    reset(net)
    net(torch.rand(2, 8, requires_grad=True))
    assert not plain[0].requires_grad and plain[0].grad_fn is None
    assert kept[0].requires_grad


def test_bad_input_names_the_model_or_layer():
    with pytest.raises(ValueError, match="Linear has no spiking-neuron modules"):
        ss.OutputMonitor(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no modules of type"):
        ss.OutputMonitor(snntorch_net(), nn.Conv2d)
    net = snntorch_net()
    mon = ss.AttributeMonitor("no_such_thing", False, net)
    with pytest.raises(AttributeError, match="layer '1' \\(Leaky\\) has no attribute 'no_such_thing'"):
        net(torch.rand(2, 8))
    mon.close()
    with pytest.raises(ValueError, match="not a known neuron"):
        ss.FiringRateMonitor(net, nn.Linear)
    with pytest.raises(KeyError, match="not monitored"):
        ss.OutputMonitor(net)["7"]


def test_a_plain_snntorch_model_does_not_import_spikingjelly_or_norse():
    # the adapters of a framework join once the user's program has imported it: a model holding its
    # neurons must have; importing them ourselves cost ~1.5 s and their deprecation warnings
    import subprocess
    import sys
    code = ("import sys, torch, snntorch as snn\n"
            "from stablespike import FiringRateMonitor\n"
            "net = torch.nn.Sequential(torch.nn.Linear(4, 8), snn.Leaky(beta=0.9, init_hidden=True))\n"
            "with FiringRateMonitor(net) as m:\n"
            "    net(torch.rand(2, 4))\n"
            "print(m.table()[0]['layer'], 'spikingjelly' in sys.modules, 'norse' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "False", "False"], out.stderr[-2000:]
