"""SpikeProfiler: seed 003's snippets as written, rates, attach on broken models, reports, bad input."""
import json
import re
import warnings

import numpy as np
import pytest
import snntorch as snn
import torch
from torch import nn

import stablespike as ss
from stablespike import SpikeProfiler


def test_seed003_quick_start_and_checks_run_as_written(capsys):
    rng = np.random.default_rng(0)
    profiler = SpikeProfiler()
    for epoch in range(3):
        for batch in range(4):
            spikes_hidden = (rng.random((32, 100)) < 0.2).astype(np.float32)  # numpy
            v_hidden = rng.normal(size=(32, 100))
            spikes_output = torch.zeros(32, 10)  # torch, dead by construction
            v_output = torch.randn(32, 10)
            profiler.record_step("hidden", spikes_hidden, voltages=v_hidden)
            profiler.record_step("output", spikes_output, voltages=v_output)
    report = profiler.report()
    print(report.summary())
    if report.has_critical:
        print("CRITICAL issues found!")
        for p in report.pathologies:
            print(f" [{p.severity.value}] {p.category} @ {p.layer}")
            print(f" {p.message}")
            print(f" Fix: {p.suggestion}")
    for name, stats in report.layer_stats.items():
        print(f"{name}:")
        print(f" Neurons: {stats.n_neurons}")
        print(f" Firing rate: {stats.firing_rates.mean():.3f}")
        print(f" Dead: {stats.dead_neuron_count} ({stats.dead_neuron_fraction:.0%})")
        print(f" Voltage: {stats.voltage_mean:.3f} +/- {stats.voltage_std:.3f}")
    out = capsys.readouterr().out
    assert "CRITICAL issues found!" in out and "[CRITICAL] silent_layer @ output" in out
    assert "dead_neurons @ output" not in out  # a silent layer is reported once
    assert report.layer_stats["hidden"].firing_rates.mean() == pytest.approx(0.2, abs=0.01)
    assert report.layer_stats["hidden"].voltage_std == pytest.approx(1.0, abs=0.02)


def test_recording_gradients_as_in_seed003():
    profiler = SpikeProfiler()
    for step in range(5):
        profiler.record_step("hidden", torch.ones(4, 8), voltages=torch.rand(4, 8),
                             gradients=torch.full((4, 8), 1e-6))
        profiler.record_step("output", torch.ones(4, 2), gradients=torch.ones(4, 2))
    report = profiler.report()
    vanishing = [p for p in report.pathologies if p.category == "gradient_vanishing"]
    assert len(vanishing) == 1 and vanishing[0].layer == "hidden"
    assert report.layer_stats["output"].grad_norm_mean == pytest.approx(np.sqrt(8))


@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_batch_size_does_not_change_a_rate(batch):
    profiler = SpikeProfiler()
    g = torch.Generator().manual_seed(batch)
    for _ in range(40):
        profiler.record_step("l", (torch.rand(batch, 500, generator=g) < 0.02).float())
    rate = profiler.report().layer_stats["l"].firing_rates.mean()
    assert rate == pytest.approx(0.02, abs=0.004)  # the seed's profiler reported B x 0.02


def test_a_time_batch_tensor_counts_as_T_steps():
    s = torch.zeros(10, 4, 3)
    s[:, :, 0] = 1
    profiler = SpikeProfiler()
    profiler.record_step("l", s)  # (T, B, N)
    stats = profiler.report().layer_stats["l"]
    assert stats.steps == 40 and stats.firing_rates.tolist() == [1.0, 0.0, 0.0]


def leaky_net(threshold=1.0, scale=1.0, depth=2, width=32):
    torch.manual_seed(0)
    layers, d = [], 16
    for _ in range(depth):
        lin = nn.Linear(d, width)
        with torch.no_grad():
            lin.weight.mul_(scale)
        layers += [lin, snn.Leaky(beta=0.9, threshold=threshold, init_hidden=True)]
        d = width
    return nn.Sequential(*layers)


def run(net, steps=12, scale=1.0, backward=False):
    for m in net.modules():
        if isinstance(m, snn.SpikingNeuron):
            m.reset_mem()
    total = 0
    for _ in range(steps):
        total = total + net(torch.rand(8, 16) * scale).sum()
    if backward:
        total.backward()


def test_attach_reports_a_dead_network():
    net = leaky_net(threshold=1e6)
    with SpikeProfiler().attach(net) as profiler:
        run(net)
    found = {(p.category, p.layer) for p in profiler.report().pathologies}
    assert found == {("silent_layer", "1"), ("silent_layer", "3")}


def test_attach_reports_saturation():
    net = leaky_net(threshold=0.01)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.abs_()
                m.bias.fill_(1.0)
    with SpikeProfiler().attach(net) as profiler:
        run(net, scale=5.0)
    report = profiler.report()
    assert {p.category for p in report.pathologies} == {"saturated_neurons"}
    assert report.layer_stats["3"].saturated_neuron_fraction > 0.9


def test_attach_reports_vanishing_gradients_in_a_deep_mlp_with_tiny_weights():
    torch.manual_seed(0)
    model = ss.SpikingMLP(16, [64] * 12, 4, threshold=0.2)
    with torch.no_grad():
        for lin in model.linears[1:]:
            lin.weight.mul_(0.2)
    with SpikeProfiler().attach(model) as profiler:
        for _ in range(3):
            logits, _, _ = model(torch.rand(8, 10, 16) * 4)
            logits.sum().backward()
    report = profiler.report()
    vanishing = [p for p in report.pathologies if p.category == "gradient_vanishing"]
    assert vanishing and vanishing[0].layer == "lifs.0"
    stats = report.layer_stats
    assert stats["lifs.11"].grad_norm_mean > 100 * stats["lifs.0"].grad_norm_mean
    assert report.health_score < 50


def test_report_json_and_html(tmp_path):
    net = leaky_net(threshold=0.5, scale=2.0)
    profiler = SpikeProfiler().attach(net)
    run(net, backward=True)
    report = profiler.report()
    profiler.detach()
    data = json.loads(report.to_json(str(tmp_path / "r.json")))
    assert set(data["layers"]) == {"1", "3"} and data["health_score"] == report.health_score
    page = report.to_html(str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert text == page and text.startswith("<!doctype html>")
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) == 2  # firing-rate histograms and gradient norm by depth
    import base64
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)


def test_bad_input_names_the_layer():
    profiler = SpikeProfiler()
    with pytest.warns(RuntimeWarning, match="'hidden' are not 0/1"):
        profiler.record_step("hidden", torch.tensor([[0.0, 2.0, 0.5]]))
    assert profiler.report().layer_stats["hidden"].firing_rates.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="layer 'hidden'.*neurons of shape"):
        profiler.record_step("hidden", torch.zeros(2, 4))
    # NaN voltages are a finding (CRITICAL, naming the layer and step), not an input error
    profiler.record_step("out", torch.zeros(2, 3), voltages=torch.full((2, 3), float("nan")))
    nan = [p for p in profiler.report().pathologies if p.category == "non_finite"]
    assert [(p.severity, p.layer) for p in nan] == [(ss.Severity.CRITICAL, "out")]
    assert "membrane" in nan[0].message and "time step 0" in nan[0].message
    with pytest.raises(ValueError, match="'conv'.*ambiguous"):
        profiler.record_step("conv", torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="spikes of layer 'x'"):
        profiler.record_step("x", object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profiler.record_step("fine", np.array([[0, 1, 1]]))  # integer 0/1: no warning


def test_attached_gradient_norms_per_pass_and_their_sampled_estimate():
    """Oracle: GradInputMonitor (checked against spikingjelly's) records the gradient reaching
    each neuron's input at every step; a pass's norm is the root of the summed squares."""
    torch.manual_seed(0)
    model = ss.SpikingMLP(16, [32, 32], 4, threshold=0.3)
    x = torch.rand(8, 24, 16) * 3
    with ss.GradInputMonitor(model, function_on_grad_input=lambda g: float(g.pow(2).sum())) as oracle, \
            SpikeProfiler().attach(model, grad_every=1) as every, \
            SpikeProfiler().attach(model, grad_every=4) as sampled:
        model(x)[0].sum().backward()
    exact, estimate = every.report().layer_stats, sampled.report().layer_stats
    for name in ("lifs.0", "lifs.1"):
        truth = float(np.sqrt(sum(oracle[name])))
        assert len(oracle[name]) == 24
        assert exact[name].grad_norm_mean == pytest.approx(truth, rel=1e-6)
        assert estimate[name].grad_norm_mean == pytest.approx(truth, rel=0.3)
        assert estimate[name].grad_norm_mean != pytest.approx(truth, rel=1e-6)  # it did sample
    with pytest.raises(ValueError, match="grad_every"):
        SpikeProfiler().attach(model, grad_every=0)


def _layer_spikes(n=100, dead=0, seed=0):
    """(T=20, B=4, n) spikes firing at ~0.3, with the first ``dead`` neurons never firing."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(20, 4, n, generator=g) < 0.3).float()
    s[..., :dead] = 0
    return s


@pytest.mark.parametrize("depth", [2, 14])
def test_health_score_does_not_fall_with_depth_alone(depth):
    clean, warned = SpikeProfiler(), SpikeProfiler()
    for i in range(depth):
        clean.record_step(f"l{i}", _layer_spikes(seed=i), multistep=True)
        warned.record_step(f"l{i}", _layer_spikes(dead=20, seed=i), multistep=True)  # 20 % dead
    assert clean.report().health_score == 100.0
    report = warned.report()
    assert {p.category for p in report.pathologies} == {"dead_neurons"} and len(report.pathologies) == depth
    assert report.health_score == pytest.approx(75.0)  # every layer 0.75, whatever the depth


def test_health_score_of_one_bad_layer_a_dead_network_and_a_network_finding():
    profiler = SpikeProfiler()
    for i in range(4):
        profiler.record_step(f"l{i}", _layer_spikes(dead=20 if i == 0 else 0, seed=i), multistep=True)
    assert profiler.report().health_score == pytest.approx(100 * (3 + 0.75) / 4)
    dead = SpikeProfiler()
    for i in range(3):
        dead.record_step(f"l{i}", torch.zeros(20, 4, 10), multistep=True)
    assert dead.report().health_score == 0.0
    vanishing = SpikeProfiler()
    for i, scale in enumerate((1e-6, 1.0)):
        vanishing.record_step(f"l{i}", _layer_spikes(seed=i), multistep=True, gradients=torch.full((4, 100), scale))
    report = vanishing.report()
    assert [p.category for p in report.pathologies] == ["gradient_vanishing"]
    assert report.health_score == pytest.approx(50.0)
