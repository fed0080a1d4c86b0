"""The finite-difference estimator against exponents known from mathematics (REFERENCES.md section 1)."""
import math
import warnings

import pytest
import torch

from stablespike import RecurrentSpikingMLP, SpikingMLP, SpikingVGG, finite_difference_lyapunov
from stablespike.sharing import shared_across_twins
from stablespike.twins import TwinRows

from steppers import LIFStepper, LinearMap, LogisticMap, PerSampleScale, rotation


def seq(T, B, D=1, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.rand(T, B, D, generator=g)).to(dtype)


def fd(model, x_tf, **kwargs):
    """The estimate of one of the library's sequence models on a time-first ``x_tf``, called the
    way a user calls it on a model of theirs: its own forward, samples along dimension 0."""
    return finite_difference_lyapunov(model, x_tf.transpose(0, 1), batch_dim=0, **kwargs)


@pytest.mark.parametrize("beta", [0.9, 0.5])
@pytest.mark.parametrize("weight_scale", [0.1, 1.0, 30.0])
def test_lif_below_threshold_gives_ln_beta_for_any_weights(beta, weight_scale):
    torch.manual_seed(1)
    model = SpikingMLP(12, [40, 30], 3, beta=beta, threshold=1e9)  # never fires
    with torch.no_grad():
        for lin in model.linears:
            lin.weight.mul_(weight_scale)
    res = fd(model, seq(30, 6, 12, scale=2.0), eps=1e-2)
    assert abs(float(res) - math.log(beta)) < 0.01
    assert torch.allclose(res.per_sample, torch.full((6,), math.log(beta)), atol=0.01)
    assert res.flip_fraction == 0.0


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_a_lif_stepper_below_threshold_gives_ln_beta_through_the_stepper_driver(beta):
    """An LIF network written as a stepper in plain torch (no neuron modules), so the stepper
    driver runs it: ln(beta) per sample, no spike flips; above threshold, flips are counted."""
    x = seq(30, 5, 6, scale=2.0, dtype=torch.float64)
    res = finite_difference_lyapunov(LIFStepper(beta, threshold=1e9), x, eps=1e-6)
    assert torch.allclose(res.per_sample, torch.full((5,), math.log(beta), dtype=torch.float64), atol=1e-6)
    assert res.flip_fraction == 0.0
    firing = finite_difference_lyapunov(LIFStepper(beta, threshold=0.5), x, eps=0.5)
    assert firing.flip_fraction > 0


def test_recurrent_synaptic_below_threshold_gives_ln_of_largest_decay():
    # syn' = a syn + I, mem' = b mem + syn': Jacobian [[a, 0], [a, b]], exponents ln a, ln b.
    torch.manual_seed(2)
    model = RecurrentSpikingMLP(5, [20], 2, alpha=0.9, beta=0.6, threshold=1e9)
    res = fd(model, seq(300, 4, 5), eps=1e-2, discard=50, twin_dtype=torch.float64)
    assert abs(float(res) - math.log(0.9)) < 0.01


def test_logistic_map_gives_ln2():
    res = finite_difference_lyapunov(LogisticMap(), seq(4000, 64, dtype=torch.float64), eps=1e-9)
    assert abs(float(res) - math.log(2.0)) < 2e-3
    assert math.isnan(res.flip_fraction)  # no spike state declared: flips are not defined
    assert "flips" not in str(res) and "+0.69" in str(res)


@pytest.mark.parametrize("A, expected", [
    ([[1.1, 0.0], [0.0, 0.8]], math.log(1.1)),
    (rotation(0.7, 0.9), math.log(0.9)),
    ([[0.5, 4.0], [0.0, 0.3]], math.log(0.5)),  # non-normal: transient growth, then ln 0.5
])
def test_linear_maps_give_ln_of_largest_eigenvalue_modulus(A, expected):
    # a linear map's growth does not depend on eps; T is kept where 1.1^T stays well resolved
    res = finite_difference_lyapunov(LinearMap(A), seq(200, 8, dtype=torch.float64),
                                     eps=1e-2, discard=50)
    assert abs(float(res) - expected) < 0.05 * abs(expected) + 1e-3


def test_per_sample_renormalization_differs_from_whole_batch_renormalization():
    # Sample 0 is unstable (x2 per step), the others contract (x0.5): exact exponents per sample.
    scales = [2.0, 0.5, 0.5, 0.5]
    ids = torch.arange(4, dtype=torch.float64).view(1, 4, 1).expand(20, 4, 1)
    res = finite_difference_lyapunov(PerSampleScale(scales), ids, eps=1e-2)
    exact = torch.log(torch.tensor(scales, dtype=torch.float64))
    assert torch.allclose(res.per_sample, exact, atol=1e-9)
    # Whole-batch renormalization (one scale for the batch tensor), as the seeds' defect does:
    whole = _whole_batch_benettin(PerSampleScale(scales), ids, eps=1e-2)
    assert abs(whole - math.log(2.0)) < 0.1  # the whole perturbation aligned with sample 0
    assert abs(float(res) - whole) > 0.5


def _whole_batch_benettin(stepper, x, eps):
    """Reference of the defect: one norm over the whole batch tensor, log of the batch growth."""
    B = x.shape[1]
    state = stepper.init_state(B, x.device, x.dtype)
    twin = (state[0] + eps * torch.ones_like(state[0]) / math.sqrt(state[0].numel()),)
    total = 0.0
    for t in range(x.shape[0]):
        _, state = stepper.step(x[t], state)
        _, twin = stepper.step(x[t], twin)
        diff = twin[0] - state[0]
        growth = diff.norm() / eps
        total += math.log(float(growth))
        twin = (state[0] + diff / growth,)
    return total / x.shape[0]


@pytest.mark.parametrize("make, x", [
    (lambda: SpikingMLP(10, [32, 32, 16], 4, threshold=0.5), seq(20, 5, 10, scale=1.5)),
    (lambda: RecurrentSpikingMLP(10, [24, 16], 3, threshold=0.5), seq(20, 5, 10, scale=1.5)),
    (lambda: SpikingVGG(1, 3, base_channels=4, num_stages=2, blocks_per_stage=1, T=6, input_size=6,
                        dropout=0.0, threshold=0.5), torch.rand(6, 5, 1, 6, 6)),
])
def test_the_library_models_equal_a_hand_written_seed_style_twin_loop(make, x):
    """Seed 001's loop (nominal and twin stepped separately) with per-sample renormalization,
    from the same perturbation: the engine, which runs the model's own forward with twin rows,
    gives the same per-sample exponents and outputs."""
    torch.manual_seed(3)
    model = make().double().eval()
    x = x.double()
    eps, T, B = 1e-3, x.shape[0], x.shape[1]
    g = torch.Generator().manual_seed(7)
    forward = (lambda m, inp: m(inp)[0]) if x.dim() == 5 else (lambda m, inp: m(inp, time_first=True)[0])
    res = finite_difference_lyapunov(model, x, forward=forward, eps=eps, generator=g, output_batch_dim=0)
    # Reference: step 0 on both, perturb the continuous state (neuron order), then steps 1..T-1.
    spec = model.state_spec()
    cont = [i for i, s in enumerate(spec) if s.kind != "spike"]
    nominal = model.init_state(B, x.device, x.dtype)
    out, nominal = model.step(x[0], nominal)
    g = torch.Generator().manual_seed(7)
    directions = [torch.randn(nominal[i].shape, generator=g, dtype=x.dtype) for i in cont]
    norm = torch.sqrt(sum(d.pow(2).flatten(1).sum(1) for d in directions))
    twin = list(nominal)
    for i, d in zip(cont, directions):
        twin[i] = nominal[i] + eps * d / norm.view(-1, *[1] * (d.dim() - 1))
    total, outs = torch.zeros(B, dtype=x.dtype), [out]
    for t in range(1, T):
        out, nominal = model.step(x[t], nominal)
        _, twin = model.step(x[t], tuple(twin))
        diffs = [twin[i] - nominal[i] for i in cont]
        delta = torch.sqrt(sum(d.pow(2).flatten(1).sum(1) for d in diffs))
        total += torch.log(delta / eps)
        twin = list(twin)
        for i, d in zip(cont, diffs):
            twin[i] = nominal[i] + d * (eps / delta).view(-1, *[1] * (d.dim() - 1))
        outs.append(out)
    assert torch.allclose(res.per_sample, total / (T - 1), atol=1e-8, rtol=0)
    assert torch.allclose(res.outputs, model._logits(torch.stack(outs)), atol=1e-10)
    assert res.steps == T - 1


def test_twins_share_dropout_masks_and_batch_norm_statistics():
    """Without a perturbation, twin rows stay equal to their samples' rows through dropout (in
    training) and batch norm (batch statistics of the samples only)."""
    torch.manual_seed(8)
    rows = TwinRows(4, torch.tensor([0, 2, 3]))
    for model, x in [(SpikingMLP(6, [32, 32], 2, threshold=0.4, dropout=0.3), seq(12, 4, 6, scale=2.0)),
                     (SpikingVGG(1, 2, base_channels=4, num_stages=2, blocks_per_stage=1, T=3,
                                 input_size=6, threshold=0.4), torch.rand(3, 4, 1, 6, 6))]:
        model.train()
        with shared_across_twins(model, rows):
            out = model.step(rows.extend(x[0]), model.init_state(rows.total, None, torch.float32))[0]
        assert torch.equal(out[4:], out[[0, 2, 3]])
        assert 0 < float(out.detach().mean()) < 1  # it did spike, and dropped some spikes or rows


def test_estimate_is_differentiable_and_counts_spike_flips():
    torch.manual_seed(5)
    model = SpikingMLP(8, [64, 64], 3, threshold=0.3)
    res = fd(model, seq(25, 8, 8, scale=2.0), eps=0.5)
    assert 0.0 < res.flip_fraction <= 1.0
    res.exponent.backward()
    grad = model.linears[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_fraction_estimates_a_seeded_sub_batch():
    model = SpikingMLP(4, [16], 2, threshold=1e9)
    x = seq(10, 16, 4)
    a = fd(model, x, fraction=0.25, generator=torch.Generator().manual_seed(3))
    b = fd(model, x, fraction=0.25, generator=torch.Generator().manual_seed(3))
    assert a.per_sample.shape == (4,) and torch.equal(a.sample_index, b.sample_index)
    assert a.outputs[0].shape[0] == 16  # the nominal trajectory still covers the whole batch
    assert torch.allclose(a.outputs[0], model(x.transpose(0, 1))[0])
    assert abs(float(a) - math.log(0.9)) < 0.01


def test_lyap_layers_selects_what_is_perturbed_and_measured():
    torch.manual_seed(6)
    model = SpikingMLP(4, [16, 16], 2, beta=0.9, threshold=1e9)
    model.lifs[1].beta.fill_(0.5)
    x = seq(20, 3, 4)
    assert abs(float(fd(model, x, layers=[-1], eps=1e-2)) - math.log(0.5)) < 0.01
    assert abs(float(fd(model, x, layers=[0], eps=1e-2)) - math.log(0.9)) < 0.01
    per_layer = fd(model, x, renorm="per_layer", eps=1e-2)
    # each layer renormalized to eps/sqrt(2): the growth is the mean of the two layers' squares
    assert abs(float(per_layer) - 0.5 * math.log((0.81 + 0.25) / 2)) < 0.01


def test_float32_resolution_warning_and_float64_twin():
    model = SpikingMLP(4, [500], 2, threshold=1e9)
    x = seq(10, 2, 4)
    with pytest.warns(RuntimeWarning, match="float64"):
        fd(model, x, eps=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = fd(model, x, eps=1e-8, twin_dtype=torch.float64)
    assert abs(float(res) - math.log(0.9)) < 1e-6
    assert res.exponent.dtype == torch.float32 and res.outputs[0].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, "eps"), ({"eps": -1e-3}, "eps"), ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"), ({"renorm": "batch"}, "renorm"), ({"layers": [5]}, "layers"),
    ({"discard": 99}, "discard"), ({"renorm_every": 0}, "renorm_every"),
    ({"renorm_every": 5, "discard": 1}, "discard"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    model = SpikingMLP(4, [8, 8], 2)
    with pytest.raises(ValueError, match=match):
        fd(model, seq(5, 2, 4), **kwargs)


@pytest.mark.parametrize("x, match", [
    (torch.zeros(0, 5, 4), "empty"),
    (torch.full((2, 5, 4), float("nan")), "NaN"),
])
def test_bad_input_is_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        finite_difference_lyapunov(SpikingMLP(4, [8], 2), x, batch_dim=0)


def test_renorm_every_is_exact_for_linear_dynamics():
    stepper = LinearMap(rotation(0.4, 0.8))
    x = seq(60, 3, dtype=torch.float64)
    every_step = finite_difference_lyapunov(stepper, x, eps=1e-3, renorm_every=1)
    every_7 = finite_difference_lyapunov(stepper, x, eps=1e-3, renorm_every=7, discard=7)
    assert abs(float(every_step) - math.log(0.8)) < 1e-9
    assert abs(float(every_7) - math.log(0.8)) < 1e-9
    assert every_7.steps == 53  # 60 steps minus the 7 discarded


def test_the_resolution_warning_points_at_the_users_call():
    model = SpikingMLP(784, [256, 256], 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.rand(4, 5, 784), compute_lyapunov=True)
    found = [w for w in caught if "below what torch.float32 resolves" in str(w.message)]
    assert found and found[0].filename == __file__
