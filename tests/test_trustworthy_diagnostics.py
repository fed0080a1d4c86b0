"""Issue 16, wrong numbers: every figure here is checked against a hand count, mathematics or a peer
library's own output on the same input (spikingjelly's v_seq, norse's recorded states, torch's
clip_grad_norm_), never against stablespike's own earlier output."""
import copy
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import stablespike as ss
from stablespike import FiringRate, GradNorm, MembraneStats, SpikeProfiler, StabilityMonitor, Thresholds


# --- 1. statistics accumulate in float32 / float64 whatever the spikes' dtype ---------------------

@pytest.mark.parametrize("dtype,steps", [(torch.bool, 10), (torch.int8, 300), (torch.uint8, 300),
                                         (torch.float16, 3000), (torch.bfloat16, 3000)])
def test_an_always_firing_neuron_reads_one_in_every_dtype(dtype, steps):
    single = FiringRate()
    for _ in range(steps):
        single.update(torch.ones(2, 3, dtype=dtype))  # (B, N), one step per call
    multi = FiringRate()
    multi.update(torch.ones(steps + 1, 1, 3, dtype=dtype), multistep=True)  # (T, B, N)
    assert single.compute().tolist() == [1.0] * 3 and single.count == 2 * steps
    assert multi.compute().tolist() == [1.0] * 3


def test_profiler_and_monitor_count_bool_spikes_of_a_registered_neuron():
    class BoolNeuron(nn.Module):  # always fires; returns bool spikes, as spikingjelly advises for memory
        def forward(self, x):
            return torch.ones_like(x, dtype=torch.bool)

    registry = ss.neurons.NeuronRegistry()
    registry.register(BoolNeuron)
    net = nn.Sequential(nn.Linear(3, 4), BoolNeuron())
    with ss.FiringRateMonitor(net, registry=registry) as mon, \
            SpikeProfiler().attach(net, registry=registry) as prof:
        for _ in range(5):
            net(torch.rand(2, 3))
    assert mon.rates()["1"].tolist() == [1.0] * 4
    assert prof.report().layer_stats["1"].firing_rates.tolist() == [1.0] * 4
    by_hand = SpikeProfiler()
    for _ in range(10):
        by_hand.record_step("l", torch.ones(4, 6, dtype=torch.bool))
    assert by_hand.report().layer_stats["l"].firing_rates.tolist() == [1.0] * 6


# --- 2. membranes of multi-step neurons: every step, or a warning; never a wrong number ----------

def _sj_lif(store):
    from spikingjelly.activation_based import neuron
    return neuron.LIFNode(tau=2.0, step_mode="m", store_v_seq=store)


def test_spikingjelly_multistep_membranes_match_its_own_v_seq():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional
    x = torch.rand(8, 3, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * 1.5  # (T, B, C, H, W)
    oracle = _sj_lif(True)
    oracle(x)
    v_seq = oracle.v_seq.double()  # spikingjelly's own per-step membranes, (T, B, C, H, W)
    lif = _sj_lif(False)  # the tutorial default
    net = nn.Sequential(lif)
    with ss.MembraneMonitor(net) as mon, SpikeProfiler().attach(net) as prof:
        assert lif.store_v_seq is True  # switched on while monitored ...
        net(x)
    assert lif.store_v_seq is False  # ... and restored
    functional.reset_net(net)
    stats = mon.compute()["0"]
    assert stats["mean"].shape == (2, 5, 5)
    assert torch.allclose(stats["mean"], v_seq.mean(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(stats["std"], v_seq.std(dim=(0, 1), unbiased=False), atol=1e-6)
    layer = prof.report().layer_stats["0"]
    assert layer.voltage_steps == 8
    assert layer.voltage_mean == pytest.approx(float(v_seq.mean()), abs=1e-6)
    assert layer.voltage_std == pytest.approx(float(v_seq.std(unbiased=False)), rel=1e-5)


def test_norse_multistep_lif_membranes_are_recorded_or_refused_with_how():
    norse = pytest.importorskip("norse.torch")
    x = torch.rand(6, 4, 5, generator=torch.Generator().manual_seed(1)) * 300  # (T, B, N)
    plain = nn.Sequential(norse.LIF())
    with pytest.warns(RuntimeWarning, match="record_states=True"), ss.MembraneMonitor(plain) as mon:
        plain(x)
    assert mon.compute() == {}  # no number rather than a wrong one
    with pytest.warns(RuntimeWarning, match="record_states=True"), SpikeProfiler().attach(plain) as prof:
        plain(x)
    layer = prof.report().layer_stats["0"]
    assert math.isnan(layer.voltage_mean) and layer.voltage_steps == 0
    recorded = nn.Sequential(norse.LIF(record_states=True))
    _, states = recorded[0](x)
    v = states.v.double()  # norse's own per-step membranes (T, B, N)
    with ss.MembraneMonitor(recorded) as mon:
        recorded(x)
    stats = mon.compute()["0"]
    assert stats["mean"].shape == (5,)
    assert torch.allclose(stats["mean"], v.mean(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(stats["std"], v.std(dim=(0, 1), unbiased=False), atol=1e-6)


# --- 3. non-spiking integrators are not spiking layers --------------------------------------------

def test_norse_leaky_integrators_are_not_found_as_spiking_neurons():
    norse = pytest.importorskip("norse.torch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif, self.out = nn.Linear(3, 4), norse.LIFCell(), norse.LICell()

        def forward(self, x):
            z, _ = self.lif(self.fc(x))
            v, _ = self.out(z)
            return v

    assert [name for name, _ in ss.find_neurons(Net())] == ["lif"]
    with ss.FiringRateMonitor(Net()) as mon:
        assert mon.monitored_layers == ["lif"]
    with pytest.raises(ValueError, match="no spiking-neuron modules"):
        ss.find_neurons(nn.Sequential(norse.LICell(), norse.LI()))


# --- 4. one definition per concept ------------------------------------------------------------------

def test_stability_monitor_and_profiler_share_the_saturation_threshold():
    spikes = torch.zeros(100, 10)  # (T, H): 10 neurons firing at 0.92, below the 0.95 of seed 003
    spikes[:92] = 1
    mon = StabilityMonitor()
    assert mon.compute_firing_stats(spikes)[3] == 0.0
    prof = SpikeProfiler()
    prof.record_step("l", spikes.unsqueeze(1), multistep=True)
    assert prof.report().layer_stats["l"].saturated_neuron_fraction == 0.0
    busy = torch.zeros(2, 100, 10)  # (B, T, H) at rate 0.85: above seed 000's 0.8, below 0.95
    busy[:, :85] = 1
    for _ in range(10):
        mon.compute(nn.Linear(1, 1), spikes=busy)
    assert mon.get_trends()["firing"] == "HEALTHY"
    strict = StabilityMonitor(thresholds=Thresholds(saturated_rate=0.8))
    assert strict.compute_firing_stats(spikes)[3] == 1.0 and strict.saturated_threshold == 0.8


def _gradient_with_spectrum(values, shape=(64, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    s = torch.zeros(shape, dtype=torch.float64)
    for i, value in enumerate(values):
        s[i, i] = value
    return (u @ s @ v.T).float()


def test_the_conditioning_alarm_reads_the_numerical_rank():
    model = nn.Linear(32, 64, bias=False)
    model.weight.grad = _gradient_with_spectrum([10.0, 4.0, 1.0])  # rank 3 of 32: singular 10, 4, 1
    mon = StabilityMonitor()
    m = mon.compute(model, compute_sv=True)
    assert m.grad_condition_eff == pytest.approx(10.0, rel=1e-4)  # 10 / 1 over the numerical rank
    assert m.grad_condition > 1e5  # seed 000's raw number stays available, and huge
    assert "lower the learning rate" not in mon.diagnose()
    bad = nn.Linear(32, 64, bias=False)
    bad.weight.grad = _gradient_with_spectrum([1.0])  # rank 1: condition 1
    assert mon.compute(bad, compute_sv=True).grad_condition_eff == pytest.approx(1.0)


def test_the_conditioning_statistic_does_not_depend_on_the_batch_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    x[:, :6] = 0  # constant inputs: a rank-deficient weight gradient, as pixels at an image border
    figures = []
    for order in (torch.arange(16), torch.arange(15, -1, -1)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[order]), y[order]).backward()
        m = StabilityMonitor().compute(model, compute_sv=True)
        figures.append((m.grad_condition, m.grad_condition_eff))
    (raw_a, eff_a), (raw_b, eff_b) = figures
    assert eff_a == pytest.approx(eff_b, rel=1e-4)
    assert eff_a < 1e4


def test_gradient_norms_have_one_definition_each():
    torch.manual_seed(0)
    model = ss.SpikingMLP(16, [32, 32], 4, threshold=0.3)
    x = torch.rand(8, 12, 16) * 3
    with ss.GradInputMonitor(model, function_on_grad_input=lambda g: float(g.double().pow(2).sum())) as oracle, \
            ss.GradNormMonitor(model) as norms, SpikeProfiler().attach(model) as prof:
        model(x)[0].sum().backward()
    report, table = prof.report().layer_stats, norms.compute()
    for name in ("lifs.0", "lifs.1"):
        truth = math.sqrt(sum(oracle[name]))  # the layer gradient norm of one backward pass
        assert table[name]["mean"] == pytest.approx(truth, rel=1e-6) and table[name]["count"] == 1
        assert report[name].grad_norm_mean == pytest.approx(truth, rel=1e-6)
    clipped = float(nn.utils.clip_grad_norm_(model.parameters(), float("inf")))  # torch's own
    assert StabilityMonitor().compute(model).grad_norm == pytest.approx(clipped, rel=1e-6)


def _fake_ranks(accumulators):
    """Run ``sync`` of each accumulator in its own thread, with a reduce that really combines the
    threads' tensors (a stand-in for torch.distributed's all-reduce / all-gather)."""
    n = len(accumulators)
    barrier, slots, out = threading.Barrier(n), [None] * n, [None] * n

    def run(rank):
        def reduce(t, kind):
            slots[rank] = t.clone()
            barrier.wait()
            parts = list(slots)
            barrier.wait()
            if kind == "cat":
                return torch.cat(parts)
            op = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[kind]
            acc = parts[0]
            for p in parts[1:]:
                acc = op(acc, p)
            return acc
        out[rank] = copy.deepcopy(accumulators[rank]).sync(reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_statistics_merge_across_ranks_by_their_declared_reductions():
    g = torch.Generator().manual_seed(3)
    spikes = (torch.rand(6, 8, 5, generator=g) < 0.3)
    volts = torch.randn(6, 8, 5, generator=g, dtype=torch.float64) * 2 + 40
    rates, membranes, grads = [FiringRate(), FiringRate()], [MembraneStats(), MembraneStats()], [GradNorm(), GradNorm()]
    for r in range(2):  # rank r holds samples 4r .. 4r+3
        rates[r].update(spikes[:, 4 * r:4 * r + 4], multistep=True)
        membranes[r].update(volts[:, 4 * r:4 * r + 4], multistep=True)
        grads[r].update(torch.full((3,), 1.0 + r))
    for merged in _fake_ranks(rates):
        assert torch.allclose(merged.compute(), spikes.double().mean(dim=(0, 1)))  # hand count
    for merged in _fake_ranks(membranes):
        stats = merged.compute()
        assert torch.allclose(stats["mean"], volts.mean(dim=(0, 1)))
        assert torch.allclose(stats["std"], volts.std(dim=(0, 1), unbiased=False))
        assert torch.equal(stats["max"], volts.amax(dim=(0, 1)))
    for merged in _fake_ranks(grads):
        assert merged.compute()["max"] == pytest.approx(2 * math.sqrt(3)) and len(merged.recent) == 2
    empty = _fake_ranks([FiringRate(), rates[1]])  # a rank that saw nothing adds nothing
    assert torch.allclose(empty[0].compute(), spikes[:, 4:].double().mean(dim=(0, 1)))


# --- 5. NaN / inf is a CRITICAL finding naming the layer and the first step -----------------------

def _non_finite(report):
    return [p for p in report.pathologies if p.category == "non_finite"]


def test_a_nan_weight_and_a_nan_loss_are_critical_findings():
    torch.manual_seed(0)
    model = ss.SpikingMLP(6, [8, 8], 3)
    with torch.no_grad():
        model.linears[1].weight[0, 0] = float("nan")  # feeds the second neuron layer
    with SpikeProfiler().attach(model) as prof:
        model(torch.rand(4, 5, 6))
    found = _non_finite(prof.report())
    assert [(p.severity, p.layer) for p in found] == [(ss.Severity.CRITICAL, "lifs.1")]
    assert "membrane" in found[0].message and "time step 0" in found[0].message
    model = ss.SpikingMLP(6, [8, 8], 3)
    with SpikeProfiler().attach(model) as prof:
        (model(torch.rand(4, 5, 6))[0].sum() * float("nan")).backward()
    found = _non_finite(prof.report())
    assert {p.layer for p in found} == {"lifs.0", "lifs.1"}
    assert all("gradient" in p.message and "backward pass 0" in p.message for p in found)
    assert prof.report().health_score < 75


def test_the_first_step_with_a_nan_is_named():
    class Pass(nn.Module):
        def forward(self, x):
            return (x > 0.5).float(), x  # (spikes, membrane)

    registry = ss.neurons.NeuronRegistry()
    registry.register(Pass, membrane=lambda m, out: out[1])
    net = nn.Sequential(Pass())
    with SpikeProfiler().attach(net, registry=registry) as prof:
        for t in range(6):
            net(torch.full((2, 3), float("nan") if t >= 3 else 0.2))
    found = _non_finite(prof.report())
    assert len(found) == 1 and "time step 3" in found[0].message
    by_hand = SpikeProfiler()
    by_hand.record_step("l", torch.zeros(5, 2, 3), voltages=torch.tensor([0.0, 0, 1, float("inf"), 0]
                                                                          ).view(5, 1, 1).expand(5, 2, 3),
                        multistep=True)
    assert "time step 3" in _non_finite(by_hand.report())[0].message


def test_stability_diagnosis_names_a_nan_gradient():
    mon = StabilityMonitor()
    model = nn.Linear(2, 2)
    for i in range(12):
        model.weight.grad = torch.full((2, 2), float("nan") if i == 7 else 1.0)
        mon.compute(model)
    text = mon.diagnose()
    assert "CRITICAL" in text and "NaN" in text and "measurement 7" in text


# --- 6. bad input: an error naming the argument -------------------------------------------------------

def _lif_net():
    import snntorch as snn
    return nn.Sequential(nn.Linear(3, 4), snn.Leaky(beta=0.9))


BAD = [
    (lambda: SpikeProfiler(dead_rate=-1), ValueError, "dead_rate"),
    (lambda: SpikeProfiler(saturated_rate=1.5), ValueError, "saturated_rate"),
    (lambda: SpikeProfiler(explosion_ratio=float("nan")), ValueError, "explosion_ratio"),
    (lambda: SpikeProfiler(voltage_min_steps=2.5), ValueError, "voltage_min_steps"),
    (lambda: SpikeProfiler(thresholds={"dead_rate": 0.1}), TypeError, "thresholds"),
    (lambda: Thresholds(dead_critical="0.5"), ValueError, "dead_critical"),
    (lambda: SpikeProfiler().attach(_lif_net(), grad_every=True), ValueError, "grad_every"),
    (lambda: SpikeProfiler().record_step(3, torch.zeros(2, 3)), TypeError, "layer"),
    (lambda: SpikeProfiler().record_step("l", "spikes"), TypeError, "spikes"),
    (lambda: SpikeProfiler().record_step("l", torch.zeros(2, 3), multistep="yes"), TypeError, "multistep"),
    (lambda: SpikeProfiler().record_step("l", torch.zeros(2, 3, dtype=torch.complex64)), TypeError, "spikes"),
    (lambda: ss.FiringRateMonitor(_lif_net(), instance="Leaky"), TypeError, "instance"),
    (lambda: ss.OutputMonitor(_lif_net(), instance=["Leaky"]), TypeError, "instance"),
    (lambda: ss.MembraneMonitor(_lif_net(), registry="snntorch"), TypeError, "registry"),
    (lambda: ss.OutputMonitor(_lif_net(), function_on_output="mean"), TypeError, "function_on_output"),
    (lambda: ss.OutputMonitor(_lif_net(), keep_graph="no"), TypeError, "keep_graph"),
    (lambda: ss.GradNormMonitor(_lif_net(), grad_every=0), ValueError, "grad_every"),
    (lambda: FiringRate().update([0, 1, 1]), TypeError, "spikes"),
    (lambda: FiringRate().update(torch.zeros(2, 3, dtype=torch.complex64)), TypeError, "spikes"),
    (lambda: MembraneStats().update(np.zeros((2, 3))), TypeError, "membrane"),
    (lambda: GradNorm().update([1.0]), TypeError, "grad"),
    (lambda: GradNorm(window=0), ValueError, "window"),
    (lambda: StabilityMonitor(history_size="100"), ValueError, "history_size"),
    (lambda: StabilityMonitor(dead_threshold=-0.1), ValueError, "dead_threshold"),
    (lambda: StabilityMonitor(saturated_threshold=2), ValueError, "saturated_threshold"),
    (lambda: StabilityMonitor().compute("model"), TypeError, "model"),
    (lambda: StabilityMonitor().compute_firing_stats(np.ones((2, 3))), TypeError, "spikes"),
    (lambda: ss.register_neuron(nn.ReLU, spikes="out"), TypeError, "spikes"),
    (lambda: ss.register_neuron(nn.ReLU, threshold=1.0), TypeError, "threshold"),
    (lambda: ss.DiagnosticsCallback(every=True), ValueError, "every"),
    (lambda: ss.DiagnosticsCallback(max_history=0), ValueError, "max_history"),
    (lambda: ss.DiagnosticsCallback(compute_sv="yes"), TypeError, "compute_sv"),
    (lambda: ss.DiagnosticsCallback(sink="log.jsonl"), TypeError, "sink"),
    (lambda: ss.DiagnosticsCallback(profiler=StabilityMonitor()), TypeError, "profiler"),
]


@pytest.mark.parametrize("call,error,word", BAD, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=rf"\b{word}\b"):  # the argument's name, not e.g. "isinstance"
        call()
