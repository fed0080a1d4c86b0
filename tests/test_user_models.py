"""The module estimators on models written the way each framework's tutorials write them
(tests/user_models.py), against values known from mathematics.

Below threshold nothing fires, so every neuron is a linear leaky integrator whose state
difference between twins evolves by its leak alone: the finite-difference exponent and every
tangent exponent are ln(leak) of the slowest mode, whatever the weights and inputs
(snnTorch Leaky ln(beta), RSynaptic ln(max(alpha, beta)), spikingjelly LIF ln(1 - 1/tau),
norse LIFCell (Euler, dt) ln(max(1 - dt*tau_mem_inv, 1 - dt*tau_syn_inv))). The leak constants
are read from the built model, never from the estimator.
"""
import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import stablespike
from stablespike import analyze_dynamics, depthwise_gain, finite_difference_lyapunov, tangent_spectrum

import user_models as um

MODELS = ["snntorch_tutorial5", "snntorch_tutorial7_conv", "snntorch_rsynaptic",
          "spikingjelly_csnn", "norse_lifcell_loop"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sj_forward(m, x):
    """The spikingjelly tutorial's call, with the reset users make between batches."""
    from spikingjelly.activation_based import functional
    functional.reset_net(m)
    return m(x)


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    forward: Optional[Callable]  # None: model(x)
    batch_dim: int
    first_weight: nn.Parameter  # the first layer's weights (Linear / Conv2d)
    n_neurons: int

    @property
    def kw(self):
        return {"forward": self.forward, "batch_dim": self.batch_dim}

    def plain(self, model=None):
        """The plain forward, as the user runs it (fresh initial state)."""
        model = self.model if model is None else model
        return (self.forward or (lambda m, x: m(x)))(model, self.x)


def make(name, *, T=8, B=3, gain=4.0, below=False, seed=0, **extra) -> Case:
    """``below``: threshold 1e9 (nothing ever fires); else ``gain`` scales the default weights
    so that the models spike on their inputs."""
    g = _gen(100 + seed)
    wg = 1.0 if below else gain
    if name == "snntorch_tutorial5":
        kw = dict(num_inputs=6, num_hidden=10, num_outputs=3, num_steps=T, weight_gain=wg, **extra)
        m = um.snntorch_tutorial5(threshold=1e9, **kw) if below else um.snntorch_tutorial5(**kw)
        return Case(m, torch.rand(B, 6, generator=g), None, 0, m.fc1.weight, 2)
    if name == "snntorch_tutorial7_conv":
        kw = dict(num_steps=T, in_size=12, weight_gain=wg, **extra)
        m = um.snntorch_tutorial7_conv(threshold=1e9, **kw) if below else um.snntorch_tutorial7_conv(**kw)
        x = 2 * torch.rand(T, B, 1, 12, 12, generator=g)
        return Case(m, x, um.snntorch_tutorial7_forward(T), 1, m[0].weight, 3)
    if name == "snntorch_rsynaptic":
        kw = dict(num_inputs=6, weight_gain=wg, **extra)
        m = um.snntorch_rsynaptic(threshold=1e9, **kw) if below else um.snntorch_rsynaptic(**kw)
        return Case(m, torch.rand(T, B, 6, generator=g), None, 1, m.fc1.weight, 2)
    if name == "spikingjelly_csnn":
        kw = dict(channels=2, in_size=8, weight_gain=wg, **extra)
        m = um.spikingjelly_csnn(v_threshold=1e9, **kw) if below else um.spikingjelly_csnn(**kw)
        x = torch.rand(T, B, 1, 8, 8, generator=g)
        return Case(m, x, _sj_forward, 1, m[0].weight, 3)
    if name == "norse_lifcell_loop":
        kw = dict(num_inputs=6, num_hidden=10, num_outputs=3, weight_gain=wg, **extra)
        m = um.norse_lifcell_loop(v_th=1e9, **kw) if below else um.norse_lifcell_loop(**kw)
        return Case(m, 20 * torch.rand(T, B, 6, generator=g), None, 1, m.fc1.weight, 2)
    raise KeyError(name)


def leak_exponent(model: nn.Module) -> float:
    """ln of the slowest per-step decay among the model's neurons, from their own parameters."""
    import norse.torch as norse
    import snntorch as snn
    from spikingjelly.activation_based import neuron as sj_neuron

    rates = []
    for m in model.modules():
        if isinstance(m, snn.RSynaptic):
            rates += [float(m.alpha), float(m.beta)]
        elif isinstance(m, snn.Leaky):
            rates.append(float(m.beta))
        elif isinstance(m, sj_neuron.LIFNode):
            assert m.decay_input and m.v_reset == 0.0  # v' = v + (x - v) / tau
            rates.append(1.0 - 1.0 / float(m.tau))
        elif isinstance(m, norse.LIFCell):
            rates += [1.0 - m.dt * float(m.p.tau_mem_inv), 1.0 - m.dt * float(m.p.tau_syn_inv)]
    assert rates, "no neuron found"
    return math.log(max(rates))


def assert_outputs_equal(got, want, atol=1e-5):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a.detach().float(), b.detach().float(), atol=atol), \
            f"max difference {float((a.detach().float() - b.detach().float()).abs().max())}"


# --- 1. finite difference below threshold: ln(leak) ------------------------------------------

# T and discard: the norse cell's (v, i) and RSynaptic's (syn, mem) are non-normal 2x2 blocks
# whose transient must pass before the growth is the largest eigenvalue's.
BELOW = {
    "snntorch_tutorial5": dict(T=20),
    "snntorch_tutorial7_conv": dict(T=8),
    "snntorch_rsynaptic": dict(T=300, discard=50, twin_dtype=torch.float64),
    "spikingjelly_csnn": dict(T=12),
    "norse_lifcell_loop": dict(T=100, discard=50),
}


@pytest.mark.parametrize("name", MODELS)
def test_below_threshold_exponent_is_ln_leak(name):
    opts = dict(BELOW[name])
    case = make(name, T=opts.pop("T"), B=3, below=True)
    expected = leak_exponent(case.model)
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, generator=_gen(1), **case.kw, **opts)
    assert abs(float(res) - expected) < 0.01, (float(res), expected)
    assert torch.allclose(res.per_sample.detach(), torch.full((3,), expected, dtype=res.per_sample.dtype),
                          atol=0.01)
    assert res.flip_fraction == 0.0
    T = case.x.shape[0] if case.batch_dim == 1 else case.model.num_steps
    assert res.steps == T - 1 - opts.get("discard", 0)


def test_rsynaptic_exponent_follows_the_slower_of_alpha_and_beta():
    """ln(max(alpha, beta)) whichever of the two is larger (here beta > alpha; the transient
    decays like (alpha / beta)^t, fast)."""
    case = make("snntorch_rsynaptic", T=60, below=True, alpha=0.5, beta=0.85)
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, discard=20, generator=_gen(2), **case.kw)
    assert abs(float(res) - math.log(0.85)) < 0.01


def test_norse_exponent_follows_the_synaptic_rate_when_it_is_slower():
    # tau_syn_inv < tau_mem_inv: the current decays slower than the membrane
    case = make("norse_lifcell_loop", T=100, below=True, tau_mem_inv=300.0, tau_syn_inv=50.0)
    expected = math.log(1 - 0.001 * 50.0)
    assert abs(leak_exponent(case.model) - expected) < 1e-12
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, discard=50, generator=_gen(3), **case.kw)
    assert abs(float(res) - expected) < 0.01


# --- 2. outputs and batch-norm statistics equal a plain forward -------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_outputs_equal_plain_forward(name):
    case = make(name, T=6, B=4)
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, generator=_gen(4), **case.kw)
    with torch.no_grad():
        want = case.plain()
    spikes = want[0] if isinstance(want, tuple) else want
    assert spikes.sum() > 0, "the model should spike on this input"
    assert_outputs_equal(res.outputs, want)



def test_an_output_with_two_dimensions_of_the_extended_batch_size_asks_which_one():
    """A static input's forward returns (T, B + K, C) records: with T == B + K (10 steps, 8
    samples, 2 twins) the shape cannot tell time from samples. x's batch_dim (0) would cut the
    records along time: an error naming output_batch_dim, and with it the plain outputs."""
    case = make("snntorch_tutorial5", T=10, B=8)
    with pytest.raises(ValueError, match=r"output_batch_dim: .*several dimensions \(0, 1\)"):
        finite_difference_lyapunov(case.model, case.x, eps=1e-2, fraction=0.25, generator=_gen(4), **case.kw)
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, fraction=0.25, generator=_gen(4),
                                     output_batch_dim=1, **case.kw)
    with torch.no_grad():
        assert_outputs_equal(res.outputs, case.plain())

@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_spikingjelly_batchnorm_running_stats_equal_plain_forward_in_training(fraction):
    """With fraction 0.25 the first batch norm's T * B = 20 rows (before the first neuron, where
    twin rows are appended) are also 4 blocks of B + K = 5: they must still be read as samples."""
    case = make("spikingjelly_csnn", T=5, B=4)
    case.model.train()
    reference = copy.deepcopy(case.model)
    # output_batch_dim: with fraction 0.25 the B + K = 5 rows tie with T = 5 in the (T, B, C) output
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, generator=_gen(5), fraction=fraction,
                                     output_batch_dim=1, **case.kw)
    want = case.plain(reference)
    assert_outputs_equal(res.outputs, want)
    bns = [m for m in case.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ref_bns = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2
    for bn, ref in zip(bns, ref_bns):
        assert int(ref.num_batches_tracked) == 1
        assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-6)
        assert not torch.allclose(ref.running_mean, torch.zeros_like(ref.running_mean))  # it did move


def test_layers_before_the_first_neuron_run_on_the_samples_only():
    """The twins' rows are appended where a neuron gets the samples' rows: the first layer runs
    once per sample (as the seeds' loops did), every neuron state carries the twins."""
    case = make("snntorch_tutorial5", T=6, B=5)
    first = next(m for m in case.model.modules() if isinstance(m, nn.Linear))
    rows = []
    handle = first.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, fraction=0.4, generator=_gen(1),
                                         **case.kw)
    finally:
        handle.remove()
    assert set(rows) == {5} and res.per_sample.shape == (2,)


# --- 3. large eps: flips reported, gradient reaches the first layer ---------------------------

@pytest.mark.parametrize("name", MODELS)
def test_large_eps_flips_and_gradient_reaches_first_layer(name):
    case = make(name, T=8, B=3)
    case.model.zero_grad()
    res = finite_difference_lyapunov(case.model, case.x, eps=1.0, generator=_gen(6), **case.kw)
    assert 0.0 < res.flip_fraction <= 1.0
    assert res.exponent.requires_grad
    res.exponent.backward()
    grad = case.first_weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    if name == "spikingjelly_csnn":  # the path goes through the batch norm after the first conv
        bn = case.model[1]
        assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()
        assert bn.weight.grad.abs().sum() > 0


# --- 4. tangent spectrum below threshold, each framework's own surrogate ----------------------

# The 2x2 blocks' transient decays like (smaller / larger decay)^t: with the defaults (0.8 / 0.9)
# it needs T ~ 300 for 1e-3; a faster second mode (0.5) lets T = 30 reach it. The top exponent
# is still the larger decay, read from the model.
TANGENT = {
    "snntorch_tutorial5": dict(T=8, k=3, discard=0),
    "snntorch_tutorial7_conv": dict(T=6, k=2, discard=0),
    "snntorch_rsynaptic": dict(T=30, k=2, discard=10, build=dict(alpha=0.9, beta=0.5)),
    "spikingjelly_csnn": dict(T=6, k=3, discard=0),
    "norse_lifcell_loop": dict(T=30, k=2, discard=10, build=dict(tau_syn_inv=500.0)),
}


@pytest.mark.parametrize("name", MODELS)
def test_tangent_spectrum_below_threshold_is_ln_leak(name):
    opts = dict(TANGENT[name])
    case = make(name, T=opts.pop("T"), B=2, below=True, **opts.pop("build", {}))
    expected = leak_exponent(case.model)
    res = tangent_spectrum(case.model, case.x, generator=_gen(7), **case.kw, **opts)
    assert res.exponents.shape == (opts["k"],)
    assert res.per_sample.shape == (2, opts["k"])
    assert torch.allclose(res.exponents.detach().double(), torch.full((opts["k"],), expected, dtype=torch.float64),
                          atol=1e-3), (res.exponents, expected)
    assert (res.exponents[:-1] >= res.exponents[1:]).all()


# --- 5. depth-wise gain ----------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_depthwise_gain_has_one_entry_per_layer_pair(name):
    case = make(name, T=5, B=2)
    res = depthwise_gain(case.model, case.x, generator=_gen(8), **case.kw)
    assert res.per_layer.shape == (case.n_neurons - 1,)
    assert torch.isfinite(res.per_layer).all()
    assert res.per_sample.shape == (2, case.n_neurons - 1)
    assert math.isfinite(res.mean)
    assert abs(res.mean - float(res.per_layer.detach().mean())) < 1e-5


@pytest.mark.parametrize("name", ["snntorch_tutorial5", "spikingjelly_csnn", "norse_lifcell_loop"])
def test_analyze_dynamics_below_threshold(name):
    norse = name == "norse_lifcell_loop"
    case = make(name, T=30 if norse else 8, B=2, below=True,
                **(dict(tau_syn_inv=500.0) if norse else {}))
    expected = leak_exponent(case.model)
    # at threshold 1e9 the surrogate's slope underflows: no layer passes a tangent on, and the
    # depth-wise gain says that its logs were floored
    with pytest.warns(RuntimeWarning, match="depthwise_gain: a growth factor underflowed"):
        report = analyze_dynamics(case.model, case.x, eps=1e-2, k=2, depth=True,
                                  discard=10 if norse else 0, generator=_gen(9), **case.kw)
    assert abs(float(report.finite_difference) - expected) < 0.01
    assert torch.allclose(report.tangent.exponents.double(), torch.full((2,), expected, dtype=torch.float64),
                          atol=1e-3)
    assert report.depth.per_layer.shape == (case.n_neurons - 1,)
    assert not report.tangent.exponents.requires_grad  # "no gradients are kept"


# --- 6. estimating a fraction of the batch -----------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_fraction_estimates_a_quarter_and_returns_all_outputs(name):
    case = make(name, T=5, B=8)  # B + K = 10 rows tie with the conv nets' 10 classes: output_batch_dim
    res = finite_difference_lyapunov(case.model, case.x, eps=1e-2, fraction=0.25, generator=_gen(10),
                                     output_batch_dim=1, **case.kw)
    assert res.per_sample.shape == (2,)
    assert res.sample_index.shape == (2,)
    assert len(set(res.sample_index.tolist())) == 2
    assert all(0 <= int(i) < 8 for i in res.sample_index)
    with torch.no_grad():
        want = case.plain()
    assert_outputs_equal(res.outputs, want)  # shapes included: all 8 samples


# --- 7. bad input: ValueError naming what was expected and what came ---------------------------

ESTIMATORS = [finite_difference_lyapunov, tangent_spectrum, depthwise_gain, analyze_dynamics]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_model_without_neurons_names_register_neuron(estimator):
    with pytest.raises(ValueError, match="register_neuron") as info:
        estimator(nn.Linear(3, 3), torch.rand(4, 2, 3))
    assert "Linear" in str(info.value)


def test_a_framework_cell_its_adapter_declines_is_named():
    """norse's LIFRefracCell keeps v_th in p.lif, so the norse adapter does not take it for a
    spiking neuron; the error named the model only ("with neither"), not the cell it passed over."""
    import norse.torch as norse

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.cell = nn.Linear(6, 6), norse.LIFRefracCell()

        def forward(self, x):
            state, out = None, []
            for x_t in x:
                z, state = self.cell(self.fc(x_t), state)
                out.append(z)
            return torch.stack(out)
    with pytest.raises(ValueError, match=r"cell \(norse LIFRefracCell\).*no firing threshold"):
        finite_difference_lyapunov(Net(), torch.rand(5, 3, 6))


class _UnreadableLIF(nn.Module):
    """A neuron registered with a membrane accessor that finds nothing."""

    def forward(self, x, mem):
        mem = 0.9 * mem + x
        spk = (mem > 1).float()
        return spk, mem - spk


class _UnreadableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.l1, self.fc2, self.l2 = nn.Linear(6, 8), _UnreadableLIF(), nn.Linear(8, 3), _UnreadableLIF()

    def forward(self, x):  # (T, B, 6)
        m1, m2, out = torch.zeros(x.shape[1], 8), torch.zeros(x.shape[1], 3), []
        for x_t in x:
            s1, m1 = self.l1(self.fc1(x_t), m1)
            s2, m2 = self.l2(self.fc2(s1), m2)
            out.append(s2)
        return torch.stack(out)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_neuron_whose_state_cannot_be_read_is_named(estimator):
    stablespike.register_neuron(_UnreadableLIF, membrane=lambda m, out: None)
    try:
        with pytest.raises(ValueError, match="cannot read the state of neuron 'l1'") as info:
            estimator(_UnreadableNet(), torch.rand(6, 3, 6))
    finally:
        stablespike.neurons.DEFAULT_REGISTRY.unregister(_UnreadableLIF)
    assert "membrane=" in str(info.value)


@pytest.mark.parametrize("layers, expected", [([], r"at least one .* got \[\]"),
                                             (0, r"a list of .* got int 0"), ([2], r"neuron layer indices in \[-2, 1\], got \[2\]")])
def test_layers_that_name_no_neuron_layer(layers, expected):
    case = make("snntorch_tutorial5")
    with pytest.raises(ValueError, match="layers: expected " + expected):
        finite_difference_lyapunov(case.model, case.x, layers=layers, **case.kw)


@pytest.mark.parametrize("batch_dim", [5, -4])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_batch_dim_out_of_range(batch_dim, estimator):
    case = make("snntorch_rsynaptic", T=4)
    with pytest.raises(ValueError, match="batch_dim") as info:
        estimator(case.model, case.x, batch_dim=batch_dim)
    assert str(batch_dim) in str(info.value) and "(4, 3, 6)" in str(info.value)


def test_batch_dim_on_time_axis_gives_wrong_row_count():
    # (T, B, D) with batch_dim=0: the neurons see B rows, not the 2T rows of samples and twins
    case = make("snntorch_rsynaptic", T=4, B=3)
    with pytest.raises(ValueError, match="batch_dim") as info:
        finite_difference_lyapunov(case.model, case.x, batch_dim=0)
    assert "expected 8 rows" in str(info.value)


def test_batch_dim_on_feature_axis_of_static_input():
    case = make("snntorch_tutorial5", T=4, B=3)  # x (B, D), samples along 0
    with pytest.raises(ValueError, match="batch_dim"):
        finite_difference_lyapunov(case.model, case.x, batch_dim=1)


@pytest.mark.parametrize("bad", [
    lambda m, x: {"spk": m(x)[0]},
    lambda m, x: str(m(x)[0].shape),
    lambda m, x: [m(x)[0], 3],
], ids=["dict", "str", "list-with-int"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_forward_returning_non_tensors(bad, estimator):
    """Every estimator refuses a forward whose result is not tensors (the tangent spectrum and
    the depth-wise gain, which do not hand the outputs back, took it silently)."""
    case = make("snntorch_rsynaptic", T=4)
    with pytest.raises(ValueError, match="forward: expected it to return a tensor") as info:
        estimator(case.model, case.x, forward=bad)
    assert ("dict" in str(info.value)) or ("str" in str(info.value)) or ("list holding int" in str(info.value))


class _CloningLoop(nn.Module):
    """An explicit loop that breaks the state chain: a copy of mem goes back into the neuron
    (snnTorch's Leaky keeps an attribute copy of its state; a plain neuron keeps none)."""

    def __init__(self, lif=None):
        super().__init__()
        import snntorch as snn
        self.fc, self.lif = nn.Linear(4, 6), lif if lif is not None else snn.Leaky(beta=0.9)

    def forward(self, x):
        mem = torch.zeros(x.shape[1], 6)
        out = []
        for t in range(x.shape[0]):
            spk, mem = self.lif(self.fc(x[t]), mem)
            mem = mem.clone()
            out.append(spk)
        return torch.stack(out)


def test_state_chain_broken_by_clone_is_an_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="did not come back"):
        finite_difference_lyapunov(_CloningLoop(), torch.rand(8, 3, 4), eps=1e-2)


# --- 8. a registered plain-torch neuron --------------------------------------------------------

class MyLIF(nn.Module):
    def __init__(self, beta, threshold=1.0):
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, x, mem):
        mem = self.beta * mem + x
        spk = (mem > self.threshold).float()
        return spk, mem - spk * self.threshold


class _TwoMyLIF(nn.Module):
    def __init__(self, beta1, beta2, threshold=1.0):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(4, 6), MyLIF(beta1, threshold)
        self.fc2, self.lif2 = nn.Linear(6, 5), MyLIF(beta2, threshold)

    def forward(self, x):
        mem1 = torch.zeros(x.shape[1], 6)
        mem2 = torch.zeros(x.shape[1], 5)
        out = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)


@pytest.fixture
def my_lif():
    stablespike.register_neuron(MyLIF, membrane=lambda m, out: out[1])
    try:
        yield MyLIF
    finally:
        stablespike.neurons.DEFAULT_REGISTRY.unregister(MyLIF)


@pytest.mark.parametrize("beta", [0.9, 0.6])
def test_registered_neuron_below_threshold_gives_ln_beta(my_lif, beta):
    torch.manual_seed(0)
    model = _TwoMyLIF(beta, beta, threshold=1e9)
    x = torch.rand(20, 3, 4)
    res = finite_difference_lyapunov(model, x, eps=1e-2, generator=_gen(11))
    assert abs(float(res) - math.log(beta)) < 0.01
    assert res.flip_fraction == 0.0
    assert_outputs_equal(res.outputs, model(x))


def test_registered_neuron_layers_choose_whose_leak_is_measured(my_lif):
    """Two layers with leaks 0.6 and 0.9: jointly the slower (0.9) wins; layer 0 alone is 0.6;
    layer 1 alone is 0.9 (nothing fires, so layer 0's twins never reach layer 1)."""
    torch.manual_seed(0)
    model = _TwoMyLIF(0.6, 0.9, threshold=1e9)
    x = torch.rand(60, 3, 4)
    both = finite_difference_lyapunov(model, x, eps=1e-2, discard=10, generator=_gen(12))
    first = finite_difference_lyapunov(model, x, eps=1e-2, layers=[0], generator=_gen(12))
    last = finite_difference_lyapunov(model, x, eps=1e-2, layers=[-1], generator=_gen(12))
    assert abs(float(both) - math.log(0.9)) < 0.01
    assert abs(float(first) - math.log(0.6)) < 0.01
    assert abs(float(last) - math.log(0.9)) < 0.01


def test_registered_neuron_state_chain_broken_by_clone_is_an_error(my_lif):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="did not come back"):
        finite_difference_lyapunov(_CloningLoop(MyLIF(0.9)), torch.rand(8, 3, 4), eps=1e-2)


def test_unregistered_neuron_is_not_a_neuron():
    with pytest.raises(ValueError, match="register_neuron"):
        finite_difference_lyapunov(_TwoMyLIF(0.9, 0.9), torch.rand(5, 3, 4))


# --- 9. diagnostics attached during an estimate count the samples only --------------------------

@pytest.mark.parametrize("name", ["snntorch_tutorial5", "spikingjelly_csnn", "norse_lifcell_loop"])
def test_a_firing_rate_monitor_sees_the_samples_only_during_an_estimate(name):
    """A monitor hooked into the user's model while an estimate runs on it counts what a plain
    forward on the samples counts (the twin rows are left out through stablespike.context)."""
    from stablespike import FiringRateMonitor
    case = make(name, T=7, B=4)
    forward = case.forward or (lambda m, x: m(x))
    plain_model = copy.deepcopy(case.model)
    with FiringRateMonitor(plain_model) as plain:
        forward(plain_model, case.x)
        expected = plain.rates()
    with FiringRateMonitor(case.model) as during:
        finite_difference_lyapunov(case.model, case.x, forward=case.forward, batch_dim=case.batch_dim,
                                   eps=1.0, fraction=0.5)
        got = during.rates()
    assert expected.keys() == got.keys() and any(float(r.sum()) > 0 for r in expected.values())
    for layer in expected:
        assert torch.allclose(got[layer], expected[layer], atol=1e-6), layer


# --- 10. norse sequence modules (a whole sequence per call) ---------------------------------------

class _NorseSequenceNet(nn.Module):
    """norse's ``LIF`` modules over a time-first sequence, as norse's examples chain them."""

    def __init__(self, v_th: float):
        super().__init__()
        import norse.torch as norse
        p = norse.LIFParameters(v_th=torch.as_tensor(v_th))
        self.fc1, self.lif1 = nn.Linear(6, 10), norse.LIF(p)
        self.fc2, self.lif2 = nn.Linear(10, 4), norse.LIF(p)

    def forward(self, x):  # (T, B, 6)
        z, _ = self.lif1(self.fc1(x))
        z, _ = self.lif2(self.fc2(z))
        return z


def test_norse_sequence_modules_give_the_leak_and_the_plain_outputs():
    pytest.importorskip("norse")
    torch.manual_seed(0)
    net = _NorseSequenceNet(v_th=1e9)
    x = 20 * torch.rand(80, 3, 6, generator=_gen(7))
    p = net.lif1.p
    expected = math.log(max(1 - net.lif1.dt * float(p.tau_mem_inv), 1 - net.lif1.dt * float(p.tau_syn_inv)))
    res = finite_difference_lyapunov(net, x, eps=1e-2, discard=40)
    assert abs(float(res) - expected) < 0.01 and res.renorm == "per_layer"
    assert torch.equal(res.outputs, net(x))
    spectrum = tangent_spectrum(net, x, k=2, discard=40)
    assert torch.allclose(spectrum.exponents, torch.full((2,), expected), atol=1e-3)


def test_norse_sequence_modules_that_record_their_states():
    """norse's LIF(record_states=True) returns every step's state stacked: run step by step it
    must still take one step's state and give back the stack (a batch_dim error before)."""
    import norse.torch as norse
    torch.manual_seed(0)
    p = norse.LIFParameters(v_th=torch.as_tensor(1e9))
    net = norse.SequentialState(nn.Linear(6, 10), norse.LIF(p, record_states=True),
                                nn.Linear(10, 4), norse.LIF(p, record_states=True))
    x = 20 * torch.rand(60, 3, 6, generator=_gen(7))

    def forward(net, x):  # the output and the last layer's membrane at every step
        z, states = net(x)
        return z, states[-1].v
    lif = net[1]
    expected = math.log(max(1 - lif.dt * float(p.tau_mem_inv), 1 - lif.dt * float(p.tau_syn_inv)))
    res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-2, discard=30, renorm="per_layer")
    assert abs(float(res) - expected) < 0.01
    assert_outputs_equal(res.outputs, forward(net, x), atol=1e-6)
    assert res.outputs[1].shape == (60, 3, 4)


class _SharedNeuronNet(nn.Module):
    """One snnTorch Leaky module used for two layers (stateless use, explicit mem): the engine
    keeps state per module, so it must refuse, not mix the layers' states."""

    def __init__(self):
        super().__init__()
        import snntorch as snn
        self.fc1, self.fc2, self.lif = nn.Linear(4, 6), nn.Linear(6, 3), snn.Leaky(beta=0.9)

    def forward(self, x):  # (T, B, 4)
        mem1, mem2, out = self.lif.init_leaky(), self.lif.init_leaky(), []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)


def test_one_neuron_module_for_two_layers_is_refused():
    with pytest.raises(ValueError, match="several layers"):
        finite_difference_lyapunov(_SharedNeuronNet(), torch.rand(6, 3, 4), eps=1e-2)


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
def test_one_neuron_module_keeping_its_state_for_layers_of_two_widths_is_refused(framework):
    """init_hidden=True (snnTorch) or spikingjelly: the module keeps its state, so no argument
    shows the reuse; the state changing shape between calls does (snnTorch started it afresh:
    the exponent came out at -36 with no error)."""
    torch.manual_seed(0)
    if framework == "snntorch":
        import snntorch as snn
        from snntorch import utils
        lif, reset = snn.Leaky(beta=0.8, threshold=1e9, init_hidden=True), utils.reset
    else:
        from spikingjelly.activation_based import functional, neuron
        lif, reset = neuron.LIFNode(tau=2.0, v_threshold=1e9), functional.reset_net
    net = nn.Sequential(nn.Linear(6, 12), lif, nn.Linear(12, 5), lif)

    def forward(net, x):
        reset(net)
        return torch.stack([net(x_t) for x_t in x])
    with pytest.raises(ValueError, match=r"changed shape from \(8, 12\) to \(8, 5\).*several layers"):
        finite_difference_lyapunov(net, torch.rand(30, 4, 6), forward=forward, eps=1e-3)


class _LinearNeuron(nn.Module):
    """A 'neuron' whose output is its membrane (mem <- 0.9 mem + x): its tangents are exact."""

    def forward(self, x, mem):
        mem = 0.9 * mem + x
        return mem, mem


class _TwoLinearLayers(nn.Module):
    def __init__(self):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=_gen(3)))
        self.fc2 = nn.Linear(5, 5, bias=False).double()
        with torch.no_grad():
            self.fc2.weight.copy_(3.0 * q)  # every direction grows by exactly 3
        self.n1, self.n2 = _LinearNeuron(), _LinearNeuron()

    def forward(self, x):  # (T, B, 5)
        m1 = m2 = torch.zeros(x.shape[1], 5, dtype=x.dtype)
        out = []
        for t in range(x.shape[0]):
            s1, m1 = self.n1(x[t], m1)
            s2, m2 = self.n2(self.fc2(s1), m2)
            out.append(s2)
        return torch.stack(out)


def test_depthwise_gain_of_a_user_module_equals_the_known_layer_gain():
    """Through the module driver: a first-layer tangent reaches layer 2 through W = 3 x orthogonal,
    so the gain is ln 3 per sample and step (against the stepper driver's known-value test)."""
    stablespike.register_neuron(_LinearNeuron, membrane=lambda m, out: out[1])
    try:
        r = depthwise_gain(_TwoLinearLayers(), torch.rand(6, 3, 5, dtype=torch.float64))
    finally:
        stablespike.neurons.DEFAULT_REGISTRY.unregister(_LinearNeuron)
    assert torch.allclose(r.per_sample, torch.full((3, 1), math.log(3.0), dtype=torch.float64))


@pytest.mark.parametrize("surrogate", ["atan-default", "fast_sigmoid-25"])
def test_depthwise_gain_equals_a_hand_count_through_the_frameworks_surrogate(surrogate):
    """snnTorch tutorial 5 with one hidden neuron, above threshold: a unit tangent on mem1
    reaches layer 2 as W2[:, 0] * s'(mem1 - threshold) (snnTorch detaches the reset), so the
    gain per step is ln(|W2[:, 0]| * |s'(u)|) with s' the derivative of the surrogate the user
    chose, taken here by autograd through snnTorch's own spike function."""
    from snntorch import surrogate as sg
    spike_grad = None if surrogate == "atan-default" else sg.fast_sigmoid(slope=25)
    m = um.snntorch_tutorial5(num_inputs=4, num_hidden=1, num_outputs=3, num_steps=12,
                              spike_grad=spike_grad, weight_gain=3.0, seed=1)
    x = torch.rand(5, 4, generator=_gen(0))
    res = depthwise_gain(m, x, batch_dim=0, generator=_gen(2))
    with torch.no_grad():
        mem1, distances = m.lif1.init_leaky(), []
        for _ in range(m.num_steps):
            _, mem1 = m.lif1(m.fc1(x), mem1)
            distances.append(mem1 - m.lif1.threshold)
    gains = []
    for u in distances[1:]:  # the tangent starts on the state after the first step
        leaf = u.clone().requires_grad_(True)
        slope, = torch.autograd.grad(m.lif1.spike_grad(leaf).sum(), leaf)
        gains.append(torch.log(m.fc2.weight[:, 0].detach().norm() * slope[:, 0].abs()))
    hand = torch.stack(gains).mean(0)
    assert torch.allclose(res.per_sample[:, 0].detach(), hand, atol=1e-5)
    assert float(hand.std()) > 0.1  # the samples differ: the surrogate's value matters


def _batch_size_net(beta=0.8, threshold=1.0):
    """snnTorch tutorial 7's class-based net: the forward reads the batch size from x and
    reshapes a neuron's output to it (``spk2.view(batch_size, -1)``); batch norm first."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.lif1 = snn.Leaky(beta=beta, threshold=threshold)
            self.conv2, self.lif2 = nn.Conv2d(4, 4, 3), snn.Leaky(beta=beta, threshold=threshold)
            self.fc1, self.lif3 = nn.Linear(4, 3), snn.Leaky(beta=beta, threshold=threshold)

        def forward(self, x):  # x (T, B, 1, 12, 12)
            batch_size = x.shape[1]
            mem1, mem2, mem3 = self.lif1.init_leaky(), self.lif2.init_leaky(), self.lif3.init_leaky()
            spk_rec = []
            for x_t in x:
                cur1 = nn.functional.max_pool2d(self.bn1(self.conv1(x_t)), 2)
                spk1, mem1 = self.lif1(cur1, mem1)
                spk2, mem2 = self.lif2(nn.functional.max_pool2d(self.conv2(spk1), 2), mem2)
                spk3, mem3 = self.lif3(self.fc1(spk2.view(batch_size, -1)), mem3)
                spk_rec.append(spk3)
            return torch.stack(spk_rec)

    torch.manual_seed(0)
    return Net().train()


@pytest.mark.parametrize("below", [False, True])
def test_a_forward_that_reshapes_to_xs_batch_size_gets_its_twins_with_x(below):
    """Twin rows appended at the neurons would break ``view(batch_size, -1)``: the engine
    falls back to extending x, with batch norm's statistics and the random state as if the
    failed try never ran, and remembers it for the next call."""
    net = _batch_size_net(threshold=1e9 if below else 0.5)
    reference = copy.deepcopy(net)
    x = torch.rand(6, 5, 1, 12, 12, generator=_gen(2))
    torch.manual_seed(3)
    res = finite_difference_lyapunov(net, x, eps=1e-2, fraction=0.4, generator=_gen(4))
    torch.manual_seed(3)
    want = reference(x)
    assert_outputs_equal(res.outputs, want)
    assert torch.equal(net.bn1.num_batches_tracked, reference.bn1.num_batches_tracked)
    assert torch.allclose(net.bn1.running_mean, reference.bn1.running_mean, atol=1e-6)
    if below:
        assert abs(float(res.exponent) - math.log(0.8)) < 0.01
    from stablespike.lyapunov.finite_difference import _TWINS_ENTER
    assert list(_TWINS_ENTER[net].values()) == ["x"]  # the try at the neurons failed, not made again
    again = finite_difference_lyapunov(net, x, eps=1e-2, fraction=0.4, generator=_gen(4))
    assert torch.isfinite(again.exponent)


def _flattening_forward(net, x):
    """The same network run by a user's own loop that flattens with ``flatten(1)``: twin rows
    appended at the neurons pass through it."""
    mems = [net.lif1.init_leaky(), net.lif2.init_leaky(), net.lif3.init_leaky()]
    out = []
    for x_t in x:
        spk1, mems[0] = net.lif1(nn.functional.max_pool2d(net.bn1(net.conv1(x_t)), 2), mems[0])
        spk2, mems[1] = net.lif2(nn.functional.max_pool2d(net.conv2(spk1), 2), mems[1])
        spk3, mems[2] = net.lif3(net.fc1(spk2.flatten(1)), mems[2])
        out.append(spk3)
    return torch.stack(out)


def test_where_the_twins_enter_is_remembered_per_forward():
    """One model run by two forwards: the one that takes twin rows at the neurons must not make
    the engine refuse the other (which needs x extended) on its first call."""
    net = _batch_size_net(threshold=1e9)
    reference = copy.deepcopy(net)
    x = torch.rand(6, 5, 1, 12, 12, generator=_gen(2))
    for forward in (_flattening_forward, lambda m, v: m(v)):
        res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-2, fraction=0.4, generator=_gen(4))
        assert_outputs_equal(res.outputs, forward(reference, x))
        assert torch.allclose(net.bn1.running_mean, reference.bn1.running_mean, atol=1e-6)
        assert abs(float(res.exponent) - math.log(0.8)) < 0.01
    from stablespike.lyapunov.finite_difference import _TWINS_ENTER
    assert sorted(_TWINS_ENTER[net].values()) == ["neurons", "x"]


# --- state a forward carries over from one call to the next (no reset) -----------------------

def _streaming_snntorch(threshold):
    """snnTorch ``init_hidden=True`` Sequential run by a forward that does not reset it (its
    membranes carry over from one call to the next, as in streaming inference)."""
    import snntorch as snn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), snn.Leaky(beta=0.8, threshold=threshold, init_hidden=True),
                        nn.Linear(8, 3), snn.Leaky(beta=0.8, threshold=threshold, init_hidden=True, output=True))

    def forward(net, x):  # x (T, B, 5)
        return torch.stack([net(x_t)[1] for x_t in x])
    return net, forward, lambda n: n[1].mem


def _streaming_spikingjelly(threshold):
    """spikingjelly multi-step network whose forward does not call ``reset_net``."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 8), neuron.LIFNode(tau=2.0, v_threshold=threshold),
                        layer.Linear(8, 3), neuron.LIFNode(tau=2.0, v_threshold=threshold))
    functional.set_step_mode(net, "m")
    return net, lambda net, x: net(x), lambda n: n[1].v


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
@pytest.mark.parametrize("below", [False, True])
def test_state_kept_from_an_earlier_call_is_the_twins_state_too(framework, below):
    """A forward without a reset runs its neurons from the state the last call left: the twin
    rows must start from their samples' kept state, so the outputs and the state left behind
    equal a plain call's (the twins started from zero before: outputs differed by up to 1)."""
    build = _streaming_snntorch if framework == "snntorch" else _streaming_spikingjelly
    net, forward, state = build(1e9 if below else 0.5)
    reference = copy.deepcopy(net)
    x1, x2 = (2 * torch.rand(8, 4, 5, generator=_gen(s)) for s in (1, 2))
    forward(net, x1), forward(reference, x1)
    res = finite_difference_lyapunov(net, x2, forward=forward, eps=1e-3, fraction=0.5, generator=_gen(3))
    assert_outputs_equal(res.outputs, forward(reference, x2))
    assert torch.allclose(state(net), state(reference), atol=1e-6)
    if below:
        assert abs(float(res.exponent) - leak_exponent(net)) < 0.01
        spectrum = tangent_spectrum(net, x2, forward=forward, k=2)
        assert torch.allclose(spectrum.exponents.detach(), torch.full((2,), leak_exponent(net)), atol=0.01)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_spikingjelly_dropout_mask_kept_from_an_earlier_call_is_its_twins_mask_too(step_mode):
    """spikingjelly's layer.Dropout keeps its mask until reset_net; a forward that does not reset
    meets the mask an earlier call drew for the samples: the twins must get their samples' mask
    (the estimate failed on the shapes before), the outputs equal a plain call's and the mask
    left behind is the samples' one, unchanged. Below threshold the exponent is ln(1 - 1/tau)."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 16), neuron.LIFNode(tau=2.0, v_threshold=1e9), layer.Dropout(0.5),
                        layer.Linear(16, 3), neuron.LIFNode(tau=2.0, v_threshold=1e9)).train()
    functional.set_step_mode(net, step_mode)
    if step_mode == "m":
        def forward(net, x):
            return net(x)
    else:
        def forward(net, x):  # x (T, B, 5), one step at a time, no reset
            return torch.stack([net(x_t) for x_t in x])
    x1, x2 = (2 * torch.rand(7, 4, 5, generator=_gen(s)) for s in (1, 2))
    with torch.no_grad():  # deepcopy takes no state with a graph
        forward(net, x1)
    reference = copy.deepcopy(net)
    mask = net[2].mask.clone()
    res = finite_difference_lyapunov(net, x2, forward=forward, eps=1e-3, fraction=0.5, generator=_gen(3))
    assert_outputs_equal(res.outputs, forward(reference, x2))
    assert torch.equal(net[2].mask, mask)
    assert abs(float(res.exponent) - math.log(0.5)) < 0.01


def _multistep_with_torch_dropout(framework):
    """A multi-step network with a plain torch nn.Dropout between its neuron layers (it sees
    ``(T, B, F)``): spikingjelly ``step_mode="m"``, or norse's SequentialState of LIF modules.
    Layer 1 fires, layer 2 never does. Returns ``(net, forward, ln of layer 2's leak)``."""
    torch.manual_seed(0)
    if framework == "spikingjelly":
        from spikingjelly.activation_based import functional, layer, neuron
        net = nn.Sequential(layer.Linear(8, 32), neuron.LIFNode(tau=2.0, v_threshold=0.5), nn.Dropout(0.5),
                            layer.Linear(32, 4), neuron.LIFNode(tau=2.0, v_threshold=1e9, store_v_seq=True))
        functional.set_step_mode(net, "m")

        def forward(net, x):
            functional.reset_net(net)
            net(x)
            return net[4].v_seq  # layer 2's membrane (T, B, 4)
        return net.train(), forward, math.log(0.5)
    import norse.torch as norse
    net = norse.SequentialState(nn.Linear(8, 32), norse.LIF(p=norse.LIFParameters(v_th=torch.tensor(0.3))),
                                nn.Dropout(0.5), nn.Linear(32, 4),
                                norse.LIF(p=norse.LIFParameters(v_th=torch.tensor(1e9))))
    with torch.no_grad():
        net[0].weight.mul_(3)
    return net.train(), lambda net, x: net(x)[0], math.log(0.9)  # 1 - dt * tau_mem_inv, the slower


@pytest.mark.parametrize("framework", ["spikingjelly", "norse"])
def test_a_torch_dropout_between_multi_step_neurons_gives_twins_their_samples_masks(framework):
    """nn.Dropout in a multi-step model gets ``(T, B + K, F)``: its mask must be drawn for the
    samples as a plain call draws it and copied to each twin (it was drawn over all rows: the
    outputs differed from a plain call's by up to 1 and the exponent of a layer that never fires
    came out at +4 instead of its leak)."""
    net, forward, leak = _multistep_with_torch_dropout(framework)
    reference = copy.deepcopy(net)
    x = 20 * torch.rand(60, 5, 8, generator=_gen(1))
    torch.manual_seed(7)
    want = forward(reference, x)
    torch.manual_seed(7)
    res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-3, layers=[1], discard=20,
                                     fraction=0.6, renorm="per_layer")
    assert_outputs_equal(res.outputs, want, atol=1e-6)
    assert abs(float(res.exponent) - leak) < 0.01


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly-s", "spikingjelly-m"])
def test_the_state_left_behind_can_be_detached_in_place_for_truncated_bptt(framework):
    """Truncated BPTT detaches the kept state in place (snnTorch detach_hidden, spikingjelly
    detach_net); the state an estimate left was a view of the run's rows: 'Can't detach views
    in-place'."""
    import snntorch as snn
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    if framework == "snntorch":
        net = nn.Sequential(nn.Linear(8, 16), snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(16, 4),
                            snn.Leaky(beta=0.9, init_hidden=True, output=True))

        def forward(net, x):
            return torch.stack([net(x)[0] for _ in range(5)]).sum(0)

        def detach(net):
            snn.Leaky.detach_hidden()
    else:
        net = nn.Sequential(layer.Linear(8, 16), neuron.LIFNode(tau=2.0), layer.Linear(16, 4), neuron.LIFNode(tau=2.0))
        multistep = framework.endswith("m")
        functional.set_step_mode(net, "m" if multistep else "s")

        def forward(net, x):
            if multistep:
                return net(x.unsqueeze(0).repeat(5, 1, 1)).sum(0)
            return torch.stack([net(x) for _ in range(5)]).sum(0)
        detach = functional.detach_net
    res = finite_difference_lyapunov(net, 2 * torch.rand(6, 8, generator=_gen(1)), forward=forward,
                                     batch_dim=0, eps=1e-2)
    (res.outputs.sum() + res.exponent).backward()
    kept = net[3].mem if framework == "snntorch" else net[3].v
    assert kept.requires_grad and kept.shape[0] == 6  # the samples' rows, still in the graph
    before = kept.detach().clone()
    detach(net)
    kept = net[3].mem if framework == "snntorch" else net[3].v
    assert not kept.requires_grad and torch.equal(kept, before)  # detached in place, values kept


@pytest.mark.parametrize("estimator", ["tangent", "depth"])
def test_the_gradient_of_tangent_estimates_equals_a_central_difference(estimator):
    """A penalty on the tangent exponents (flossing) or the depth-wise gain: its gradient must
    include how the surrogate's slope s'(u) moves with the state (the JVP of the framework's
    spike function was taken at a detached u: the first layer's gradient came out 0 against a
    central difference of 0.03). spikingjelly single-step LIF, float64, soft reset."""
    from spikingjelly.activation_based import functional, neuron
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(tau=2., v_threshold=0.5, v_reset=None, detach_reset=True),
                        nn.Linear(8, 8), neuron.LIFNode(tau=2., v_threshold=0.5, v_reset=None, detach_reset=True)).double()

    def forward(net, x):
        functional.reset_net(net)
        return torch.stack([net(x_t) for x_t in x])
    x = 2 * torch.rand(30, 4, 6, dtype=torch.float64, generator=_gen(0))

    def value():
        if estimator == "tangent":
            return tangent_spectrum(net, x, forward=forward, k=2, generator=_gen(1)).exponents.sum()
        return depthwise_gain(net, x, forward=forward, generator=_gen(1)).per_layer.sum()
    weight, h = net[0].weight, 1e-6
    grad, = torch.autograd.grad(value(), weight)
    with torch.no_grad():
        weight[2, 3] += h
        up = value()
        weight[2, 3] -= 2 * h
        down = value()
        weight[2, 3] += h
    central = float(up - down) / (2 * h)
    assert abs(central) > 1e-3  # the first layer matters
    assert abs(float(grad[2, 3]) - central) < 1e-4 * max(1.0, abs(central))


def test_analyze_dynamics_leaves_the_model_as_one_plain_call_does():
    """analyze_dynamics runs the model once per measurement: batch norm counted three batches
    (num_batches_tracked 3 against 1 per forward) and the spikingjelly dropout mask was the last
    run's; the model is now left as after the first. Nothing it returns keeps a gradient."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), neuron.LIFNode(),
                        layer.MaxPool2d(2), layer.Flatten(), layer.Dropout(0.5), layer.Linear(4 * 4 * 4, 5),
                        neuron.LIFNode()).train()
    functional.set_step_mode(net, "m")

    def forward(net, x):
        functional.reset_net(net)
        return net(x)
    x = 3 * torch.rand(6, 4, 2, 8, 8, generator=_gen(1))
    plain = copy.deepcopy(net)
    torch.manual_seed(3)
    forward(plain, x)
    torch.manual_seed(3)
    report = stablespike.analyze_dynamics(net, x, forward=forward, eps=1e-3, k=2, depth=True)
    assert int(net[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 1
    assert torch.allclose(net[1].running_mean, plain[1].running_mean, atol=1e-6)
    assert torch.equal(net[5].mask, plain[5].mask)
    assert not report.depth.per_layer.requires_grad and not report.tangent.exponents.requires_grad


class _UserKeptMembranes(nn.Module):
    """snnTorch tutorial 5 streaming: the user's module keeps mem1, mem2 between calls."""

    def __init__(self, threshold):
        super().__init__()
        import snntorch as snn
        self.fc1, self.l1 = nn.Linear(5, 8), snn.Leaky(beta=0.9, threshold=threshold)
        self.fc2, self.l2 = nn.Linear(8, 4), snn.Leaky(beta=0.9, threshold=threshold)
        self.m1 = self.m2 = None

    def forward(self, x):  # (T, B, 5)
        m1 = self.m1 if self.m1 is not None else self.l1.init_leaky()
        m2 = self.m2 if self.m2 is not None else self.l2.init_leaky()
        out = []
        for x_t in x:
            z, m1 = self.l1(self.fc1(x_t), m1)
            z, m2 = self.l2(self.fc2(z), m2)
            out.append(z)
        self.m1, self.m2 = m1, m2
        return torch.stack(out)


@pytest.mark.parametrize("threshold", [0.3, 1e9])
def test_tangents_start_from_the_membranes_a_streaming_users_module_kept(threshold):
    """k > 1 tangents run k copies of each sample; a state the user's module kept from the last
    call had the samples' rows only, so snnTorch restarted it from zero for the wider input: the
    estimate ran on another trajectory and left other membranes than a plain call."""
    torch.manual_seed(5)
    net = _UserKeptMembranes(threshold)
    x1, x2 = (2 * torch.rand(6, 4, 5, generator=_gen(s)) for s in (1, 2))
    with torch.no_grad():
        net(x1)
    reference = copy.deepcopy(net)
    res = tangent_spectrum(net, x2, k=3, generator=_gen(3))
    with torch.no_grad():
        reference(x2)
    assert torch.allclose(net.m1, reference.m1, atol=1e-6) and torch.allclose(net.m2, reference.m2, atol=1e-6)
    if threshold > 1:
        assert torch.allclose(res.exponents.detach(), torch.full((3,), math.log(0.9)), atol=1e-4)


def test_under_cpu_autocast_the_estimate_keeps_its_arithmetic_in_the_states_precision():
    """Mixed precision in the user's loop: CPU bfloat16 autocast ran the twins' squared
    distances in bfloat16 (every sample read -0.125 for ln 0.9 = -0.105, with no flips); the
    layers may run in bfloat16, the estimate's own arithmetic may not."""
    import snntorch as snn
    from snntorch import utils
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(16, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))

    def forward(net, x):
        utils.reset(net)
        return torch.stack([net(x)[0] for _ in range(20)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = finite_difference_lyapunov(net, torch.rand(32, 6, generator=_gen(1)), forward=forward,
                                         batch_dim=0, eps=1e-4, generator=_gen(0))
    assert res.flip_fraction == 0.0
    assert torch.allclose(res.per_sample.detach(), torch.full((32,), math.log(0.9)), atol=2e-3)


@pytest.mark.parametrize("init_hidden", [False, True])
def test_twin_dtype_runs_an_rleaky_net_in_float64_on_every_call(init_hidden):
    """snnTorch's spike functions return float32 whatever the membrane's dtype, and RLeaky feeds
    its kept spikes back through its recurrent layer: with twin_dtype=float64 that layer met
    float32 spikes (init_hidden: from the first call; a user loop: from the second, through
    init_rleaky()'s zeros of the kept state). Below threshold: ln(beta) on every call."""
    import snntorch as snn
    from snntorch import utils
    torch.manual_seed(0)
    if init_hidden:
        net = nn.Sequential(nn.Linear(5, 6), snn.RLeaky(beta=0.8, linear_features=6, init_hidden=True, threshold=1e9),
                            nn.Linear(6, 3), snn.Leaky(beta=0.8, init_hidden=True, output=True, threshold=1e9))

        def forward(net, x):
            utils.reset(net)
            return torch.stack([net(x_t)[0] for x_t in x])
    else:
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.r1 = nn.Linear(5, 6), snn.RLeaky(beta=0.8, linear_features=6, threshold=1e9)

            def forward(self, x):
                spk, mem, out = *self.r1.init_rleaky(), []
                for x_t in x:
                    spk, mem = self.r1(self.fc1(x_t), spk, mem)
                    out.append(mem)
                return torch.stack(out)
        net, forward = Net(), None
    x = 3 * torch.rand(14, 4, 5, generator=_gen(1))
    for _ in range(3):
        res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-2, twin_dtype=torch.float64)
        assert abs(float(res.exponent) - math.log(0.8)) < 1e-6


def test_the_tangent_spectrum_under_cpu_autocast_with_a_bfloat16_state():
    """spikingjelly's state follows its input's dtype: under CPU bfloat16 autocast it is
    bfloat16, and the QR re-orthonormalization (float32 under autocast, no bfloat16 kernel)
    handed float32 tangents to a bfloat16 state: "expected m1 and m2 to have the same dtype"."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 16), neuron.LIFNode(tau=2., v_threshold=0.3),
                        layer.Linear(16, 16), neuron.LIFNode(tau=2., v_threshold=0.3))

    def forward(net, x):
        functional.reset_net(net)
        return torch.stack([net(x_t) for x_t in x])
    x = torch.rand(30, 4, 5, generator=_gen(1))
    want = tangent_spectrum(net, x, forward=forward, k=4, generator=_gen(0)).exponents.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tangent_spectrum(net, x, forward=forward, k=4, generator=_gen(0)).exponents.detach()
    assert torch.allclose(got.float(), want, atol=0.02)


def test_twins_share_batch_norm_under_cpu_autocast():
    """A train-mode BatchNorm1d meeting the extra rows under CPU bfloat16 autocast (rows in
    bfloat16, parameters in float32): the shared statistics came in bfloat16 and aten refused
    the mix ("mixed dtype (CPU): expect parameter to have scalar type of Float")."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.lif1 = nn.Linear(20, 30), nn.BatchNorm1d(30), snn.Leaky(beta=0.9, threshold=0.5)
            self.fc2, self.lif2 = nn.Linear(30, 10), snn.Leaky(beta=0.9, threshold=0.5)

        def forward(self, x):
            mem1, mem2, out = self.lif1.init_leaky(), self.lif2.init_leaky(), []
            for _ in range(10):
                spk1, mem1 = self.lif1(self.bn(self.fc1(x)), mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                out.append(spk2)
            return torch.stack(out)
    torch.manual_seed(0)
    net, x = Net().train(), torch.rand(8, 20, generator=_gen(1))
    reference = copy.deepcopy(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = tangent_spectrum(net, x, batch_dim=0, k=3, generator=_gen(2))
        res.exponents.sum().backward()
        reference(x)
    assert torch.isfinite(res.exponents).all() and net.fc1.weight.grad is not None
    assert torch.allclose(net.bn.running_mean, reference.bn.running_mean, atol=1e-2)


def test_a_dropout_on_a_time_flattened_tensor_as_wide_as_the_extended_batch():
    """Regression guard: in a multi-step model a dropout's input (T (B + K), H) whose H happens
    to be B + K was read as (T, B + K, ...): masks not a plain call's, and a silent layer's
    exponent at +4.8 instead of ln 0.5. The time-flattened reading comes first."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 8), neuron.LIFNode(tau=2.0, v_threshold=0.5),
                        layer.SeqToANNContainer(nn.Dropout(0.5), nn.Linear(8, 4)),
                        neuron.LIFNode(tau=2.0, v_threshold=1e9, store_v_seq=True)).train()
    functional.set_step_mode(net, "m")

    def forward(net, x):
        functional.reset_net(net)
        net(x)
        return net[3].v_seq
    reference, x = copy.deepcopy(net), 20 * torch.rand(60, 5, 8, generator=_gen(1))
    torch.manual_seed(7)
    want = forward(reference, x)
    torch.manual_seed(7)
    res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-3, layers=[1], discard=20,
                                     fraction=0.6, renorm="per_layer")  # B + K = 5 + 3 = 8 = H
    assert_outputs_equal(res.outputs, want, atol=1e-6)
    assert abs(float(res.exponent) - math.log(0.5)) < 0.01


def test_a_per_neuron_initial_state_as_long_as_the_batch_is_not_taken_for_samples():
    """Regression guard: a norse LIFCell given a learned initial membrane (H,) broadcast over
    the batch, with H == B: tangents (x extended to k B rows) extended it to 2B rows and the
    forward failed. Below threshold: ln(1 - dt tau_mem_inv) = ln 0.9 for the top exponent."""
    import norse.torch as norse

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.lif = norse.LIFCell(p=norse.LIFParameters(v_th=torch.tensor(1e9)))
            self.v0 = nn.Parameter(torch.zeros(6))

        def forward(self, x):  # (T, B, 4)
            state, out = norse.LIFFeedForwardState(v=self.v0, i=torch.zeros(6)), []
            for x_t in x:
                z, state = self.lif(self.fc(x_t), state)
                out.append(z)
            return torch.stack(out)
    torch.manual_seed(0)
    res = tangent_spectrum(Net(), torch.rand(30, 6, 4, generator=_gen(1)), k=2, generator=_gen(2))
    assert abs(float(res.exponents[0]) - math.log(0.9)) < 0.01


def test_a_model_without_parameters_computes_in_its_inputs_precision():
    """Regression guard: snnTorch's float32 buffers (beta, threshold) set the 'model dtype' of a
    parameter-free Leaky driven by a float64 current: the exponent came back float32 and, with
    twin_dtype, the outputs too, where a plain call is float64 throughout."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = snn.Leaky(beta=0.9, threshold=1e9)

        def forward(self, x):
            mem, out = self.lif.init_leaky(), []
            for x_t in x:
                _, mem = self.lif(x_t, mem)
                out.append(mem)
            return torch.stack(out)
    net, x = Net(), torch.rand(40, 4, 5, dtype=torch.float64, generator=_gen(1))
    for twin_dtype in (None, torch.float64):
        res = finite_difference_lyapunov(net, x, eps=1e-6, twin_dtype=twin_dtype, generator=_gen(2))
        assert res.outputs.dtype == res.exponent.dtype == net(x).dtype == torch.float64
        assert abs(float(res.exponent) - math.log(0.9)) < 1e-6


def _twin_loop_over_all_memories(make, x, eps=1e-6):
    """A hand-written Benettin loop for one spikingjelly node, perturbing every tensor memory it
    registers (v and w for Izhikevich), float64: the reference for the adapter's state."""
    from spikingjelly.activation_based import functional
    a, b = make().double(), make().double()
    functional.reset_net(a), functional.reset_net(b)
    a(x[0]), b(x[0])
    names = [k for k, v in a._memories.items() if isinstance(v, torch.Tensor)]
    gen = _gen(5)
    d = {k: torch.randn(getattr(a, k).shape, generator=gen, dtype=torch.float64) for k in names}
    logs = []
    for t in range(x.shape[0]):
        norm = torch.sqrt(sum(v.pow(2).sum(1) for v in d.values()))
        for k in names:
            setattr(b, k, getattr(a, k) + eps * d[k] / norm.unsqueeze(1))
        if t == x.shape[0] - 1:
            break
        a(x[t + 1]), b(x[t + 1])
        d = {k: getattr(b, k) - getattr(a, k) for k in names}
        logs.append(torch.log(torch.sqrt(sum(v.pow(2).sum(1) for v in d.values())) / eps))
    return float(torch.stack(logs).mean()), names


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_an_izhikevich_nodes_adaptation_is_part_of_its_state(step_mode):
    """spikingjelly's IzhikevichNode keeps an adaptation current w beside v; the adapter read v
    alone, so w was never perturbed or measured: -0.78 where the dynamics give -0.48 (a loop
    perturbing v and w), with no warning."""
    from spikingjelly.activation_based import functional, neuron

    def make():
        return neuron.IzhikevichNode(a=0.5, tau_w=3., step_mode=step_mode)
    x = 0.05 * torch.rand(150, 4, 6, dtype=torch.float64, generator=_gen(1))
    want, names = _twin_loop_over_all_memories(lambda: neuron.IzhikevichNode(a=0.5, tau_w=3.), x)
    assert names == ["v", "w"]
    net = nn.Sequential(make()).double()

    def forward(net, x):
        functional.reset_net(net)
        return net(x) if step_mode == "m" else torch.stack([net(x_t) for x_t in x])
    res = finite_difference_lyapunov(net, x, forward=forward, eps=1e-6, generator=_gen(2))
    assert res.flip_fraction == 0.0
    assert abs(float(res.exponent) - want) < 0.01


class _CastsItsInput(nn.Module):
    """snnTorch tutorial 5 whose forward casts x to float32 itself (x kept in another dtype)."""

    def __init__(self):
        super().__init__()
        import snntorch as snn
        self.fc1, self.lif1 = nn.Linear(6, 12), snn.Leaky(beta=0.8, threshold=1e9)
        self.fc2, self.lif2 = nn.Linear(12, 3), snn.Leaky(beta=0.7, threshold=1e9)

    def forward(self, x):
        x = x.float()
        mem1, mem2, mem_rec = self.lif1.init_leaky(), self.lif2.init_leaky(), []
        for _ in range(30):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            mem_rec.append(mem2)
        return torch.stack(mem_rec)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float64])
def test_outputs_keep_the_plain_calls_dtype_and_the_exponent_the_models(x_dtype):
    """.outputs are a plain call's, dtype included, whatever x's dtype (they were cast to x's:
    bfloat16 outputs off by 1e-3, and the exponent in bfloat16); the exponent comes in the
    model's precision."""
    torch.manual_seed(0)
    net, x = _CastsItsInput(), (3 * torch.rand(5, 6, generator=_gen(1))).to(x_dtype)
    want = net(x)
    res = finite_difference_lyapunov(net, x, batch_dim=0, eps=1e-3, generator=_gen(2))
    assert res.outputs.dtype == want.dtype == torch.float32
    assert torch.equal(res.outputs, want)
    assert res.exponent.dtype == res.per_sample.dtype == torch.float32


def test_the_fallback_restores_the_state_the_neurons_kept():
    """A forward that needs x extended and does not reset its neurons: the failed try at the
    neurons advanced them; the retry must start from the state before it (outputs and the state
    left behind equal a plain call's; without the restore the kept state is one step ahead)."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.lif1 = nn.Conv2d(1, 4, 3), snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True)
            self.fc1 = nn.Linear(4 * 5 * 5, 3)
            self.lif2 = snn.Leaky(beta=0.8, threshold=1e9, init_hidden=True, output=True)

        def forward(self, x):  # (T, B, 1, 12, 12)
            batch_size, out = x.shape[1], []
            for x_t in x:
                spk1 = self.lif1(nn.functional.max_pool2d(self.conv1(x_t), 2))
                out.append(self.lif2(self.fc1(spk1.view(batch_size, -1)))[1])
            return torch.stack(out)

    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net)
    x1, x2 = (2 * torch.rand(5, 6, 1, 12, 12, generator=_gen(s)) for s in (1, 2))
    net(x1), reference(x1)
    res = finite_difference_lyapunov(net, x2, eps=1e-3, fraction=0.5, generator=_gen(3))
    assert_outputs_equal(res.outputs, reference(x2))
    assert torch.allclose(net.lif1.mem, reference.lif1.mem, atol=1e-6)


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
def test_an_estimate_in_float64_leaves_the_state_in_the_models_precision(framework):
    """twin_dtype=float64 runs the neurons in float64; the state they keep must come back as a
    plain call leaves it (float32), or the next call computes in float64 (snnTorch's
    init_leaky() copies the kept mem's dtype) or fails on a float32 layer."""
    build = _streaming_snntorch if framework == "snntorch" else _streaming_spikingjelly
    net, forward, state = build(0.5)
    reference = copy.deepcopy(net)
    x1, x2 = (2 * torch.rand(8, 4, 5, generator=_gen(s)) for s in (1, 2))
    finite_difference_lyapunov(net, x1, forward=forward, eps=1e-3, twin_dtype=torch.float64,
                               fraction=0.5, generator=_gen(3))
    forward(reference, x1)
    assert state(net).dtype == state(reference).dtype == torch.float32
    assert_outputs_equal(forward(net, x2), forward(reference, x2))


def test_without_a_generator_the_dropout_masks_are_a_plain_calls():
    """The estimate's own draws must not shift the dropout masks the model draws from torch's
    global generator: under the same seed, .outputs equal a plain call's (a quarter of the
    spikes differed when the twin rows and directions came from the global generator)."""
    import snntorch as snn

    class Net(nn.Module):  # tutorial 5 with dropout, in training mode
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(6, 20), snn.Leaky(beta=0.9)
            self.drop, self.fc2, self.lif2 = nn.Dropout(0.5), nn.Linear(20, 3), snn.Leaky(beta=0.9)

        def forward(self, x):
            mem1, mem2, spk_rec = self.lif1.init_leaky(), self.lif2.init_leaky(), []
            for _ in range(10):
                spk1, mem1 = self.lif1(self.fc1(x), mem1)
                spk2, mem2 = self.lif2(self.fc2(self.drop(spk1)), mem2)
                spk_rec.append(spk2)
            return torch.stack(spk_rec)

    torch.manual_seed(0)
    net, x = Net().train(), 3 * torch.rand(5, 6)
    with torch.no_grad():
        net.fc2.weight.mul_(4)
    torch.manual_seed(1)
    res = finite_difference_lyapunov(net, x, batch_dim=0, eps=1e-2, fraction=0.5)
    torch.manual_seed(1)
    want = net(x)
    assert want.sum() > 0
    assert torch.equal(res.outputs, want)
    torch.manual_seed(1)
    again = finite_difference_lyapunov(net, x, batch_dim=0, eps=1e-2, fraction=0.5)
    assert torch.equal(again.per_sample, res.per_sample)  # reproducible under torch.manual_seed


@pytest.mark.parametrize("estimator", [tangent_spectrum, depthwise_gain])
def test_without_a_generator_the_tangent_estimates_leave_a_plain_calls_state(estimator):
    """The tangent spectrum and the depth-wise gain draw their directions aside from torch's
    global generator too: the model's dropout masks are a plain call's, so are the membranes
    its init_hidden neurons keep afterwards (they differed when the directions came first)."""
    import snntorch as snn
    from snntorch import utils

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True), nn.Dropout(0.3),
                             nn.Linear(16, 3), snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True, output=True)).train()

    def forward(net, x):
        utils.reset(net)
        return torch.stack([net(x_t)[1] for x_t in x])
    x, plain, net = 2 * torch.rand(20, 5, 6, generator=_gen(1)), build(), build()
    torch.manual_seed(3)
    forward(plain, x)
    want = plain[4].mem.detach().clone()  # snnTorch's reset resets every instance: keep a copy
    torch.manual_seed(3)
    estimator(net, x, forward=forward)
    assert torch.allclose(net[4].mem, want, atol=1e-6)


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
def test_a_failed_first_call_leaves_the_kept_state_as_it_was(framework):
    """A wrong batch_dim fails once the neurons have run a step: the state a streaming forward
    carries over must be the one from before the call (it was one step ahead)."""
    build = _streaming_snntorch if framework == "snntorch" else _streaming_spikingjelly
    net, forward, state = build(0.5)
    forward(net, 2 * torch.rand(8, 4, 5, generator=_gen(1)))
    before = state(net).clone()
    with pytest.raises(ValueError, match="batch_dim"):
        finite_difference_lyapunov(net, 2 * torch.rand(8, 4, 5, generator=_gen(2)), forward=forward,
                                   batch_dim=2, eps=1e-3)
    assert torch.equal(state(net), before)


def test_multi_step_layers_are_renormalized_each_to_its_share_with_a_warning():
    """A multi-step network runs layer after layer, so its layers are renormalized each on its
    own: below threshold, with leaks 0.5 and 0.8, each layer's twin shrinks by its leak per step
    and the exponent is 0.5 ln((0.5^2 + 0.8^2) / 2), not ln 0.8. Asked for global, it says so."""
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 8), neuron.LIFNode(tau=2.0, v_threshold=1e9),
                        layer.Linear(8, 3), neuron.LIFNode(tau=5.0, v_threshold=1e9))
    functional.set_step_mode(net, "m")
    x = torch.rand(12, 4, 5, generator=_gen(1))
    with pytest.warns(RuntimeWarning, match="renormalized to its share"):
        res = finite_difference_lyapunov(net, x, forward=_sj_forward, eps=1e-3, generator=_gen(2))
    assert res.renorm == "per_layer"
    assert abs(float(res.exponent) - 0.5 * math.log((0.5 ** 2 + 0.8 ** 2) / 2)) < 0.01
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        finite_difference_lyapunov(net, x, forward=_sj_forward, eps=1e-3, renorm="per_layer", generator=_gen(2))


def test_an_input_in_another_precision_than_the_model_is_named_as_the_cause():
    case = make("snntorch_tutorial5")
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 and the model's parameters torch.float32"):
        finite_difference_lyapunov(case.model, case.x.double(), **case.kw)


class _NorseStreaming(nn.Module):
    """A norse LIFCell loop whose forward keeps the cell's state between calls (chunked
    sequences): the state lives in the user's module, not in the neuron."""

    def __init__(self):
        super().__init__()
        import norse.torch as norse
        self.fc, self.cell, self.state = nn.Linear(5, 8), norse.LIFCell(), None

    def forward(self, x):  # (T, B, 5)
        out, state = [], self.state
        for x_t in x:
            z, state = self.cell(self.fc(x_t), state)
            out.append(z)
        self.state = state
        return torch.stack(out)


def test_state_a_users_module_keeps_is_left_as_a_plain_call_leaves_it():
    """The user's self.state came back with the twin rows (B + K rows): the next call failed on
    the shapes, or with one sample broadcast the twins' rows silently. After an estimate, the state
    and the next chunk's outputs equal those of a plain run."""
    torch.manual_seed(0)
    net = _NorseStreaming()
    with torch.no_grad():
        net.fc.weight.mul_(20)
    reference = copy.deepcopy(net)
    x1, x2, x3 = (torch.rand(10, 3, 5, generator=_gen(s)) for s in (1, 2, 3))
    net(x1), reference(x1)
    res = finite_difference_lyapunov(net, x2, eps=1e-3, generator=_gen(4))
    assert_outputs_equal(res.outputs, reference(x2))
    for got, want in zip(net.state, reference.state):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert_outputs_equal(net(x3), reference(x3))
