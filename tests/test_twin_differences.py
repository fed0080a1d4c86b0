"""Twins carried as differences (the VGG's fast path) against twins carried as rows of the state:
the same estimate, outputs, flips and parameter gradients; and the pieces against their
definitions (PyTorch's own layers, gradcheck)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stablespike import SpikingMLP, SpikingVGG
from stablespike.dynamics import TwinLayout, unroll
from stablespike.lyapunov import finite_difference_lyapunov
from stablespike.twin_differences import LinearDifference, batch_norm_nominal, nonzero_rows


def _estimate(model, x, differences: bool, monkeypatch, **kwargs):
    """The estimate and the parameter gradients of its exponent, twins as differences or rows."""
    with monkeypatch.context() as m:
        if not differences:
            m.setattr(SpikingVGG, "supports_twin_differences", property(lambda self: False))
        model.zero_grad()
        res = finite_difference_lyapunov(model, x, generator=torch.Generator().manual_seed(1), **kwargs)
        (res.exponent + res.outputs.pow(2).mean()).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
    return res, grads, stats


def _vgg(train: bool):
    torch.manual_seed(0)
    model = SpikingVGG(2, 3, base_channels=4, num_stages=2, blocks_per_stage=2, T=5, input_size=8,
                       threshold=0.4, dropout=0.0).double()
    return model.train(train)


@pytest.mark.parametrize("train", [True, False], ids=["batch statistics", "running statistics"])
@pytest.mark.parametrize("eps,fraction,options", [
    (1e-6, 1.0, {}),                                          # no spike flips
    (0.3, 1.0, {}),                                           # many flips
    (0.3, 0.5, {"renorm": "per_layer"}),                      # a random half of the rows
    (0.3, 1.0, {"layers": [1, -1], "renorm_every": 2}),
], ids=["no flips", "flips", "half the rows, per layer", "some layers, every 2 steps"])
@pytest.mark.parametrize("kernel", ["1", "0"], ids=["C kernel", "PyTorch operations"])
def test_differences_give_what_twin_rows_give(train, eps, fraction, options, kernel, monkeypatch):
    monkeypatch.setenv("STABLESPIKE_NATIVE", kernel)
    x = 2.0 * torch.rand(5, 6, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _vgg(train)
    twin_rows = copy.deepcopy(model)
    a, grads_a, stats_a = _estimate(model, x, True, monkeypatch, eps=eps, fraction=fraction, **options)
    b, grads_b, stats_b = _estimate(twin_rows, x, False, monkeypatch, eps=eps, fraction=fraction, **options)
    if eps > 0.1:
        assert a.flip_fraction > 0.2  # the case that exercises the flips
    else:
        assert a.flip_fraction == 0.0
    assert a.flip_fraction == b.flip_fraction
    assert torch.allclose(a.per_sample, b.per_sample, rtol=1e-9, atol=1e-8), (a.per_sample - b.per_sample).abs().max()
    assert torch.allclose(a.outputs, b.outputs, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for ga, gb in zip(grads_a, grads_b):
        # twin rows hold twin - partner with cancellation (~1e-16 / eps relative): a little noise
        assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-6 * float(gb.abs().max())), (ga - gb).abs().max()
    for sa, sb in zip(stats_a, stats_b):  # running statistics and num_batches_tracked
        assert torch.allclose(sa, sb, rtol=1e-12, atol=1e-12)


def test_the_vgg_carries_its_twins_as_differences():
    model = SpikingVGG(1, 2, base_channels=2, num_stages=1, blocks_per_stage=1, T=2, input_size=4)
    assert model.supports_twin_differences
    seen = []
    step = model.step
    model.step = lambda x_t, state, twins=None: seen.append(twins.differences) or step(x_t, state, twins)
    x = torch.rand(2, 8, 1, 4, 4)
    finite_difference_lyapunov(model, x, fraction=1.0)
    finite_difference_lyapunov(model, x, fraction=0.25)
    assert seen == [True] * 4


def test_a_vgg_with_an_snntorch_surrogate_keeps_twin_rows():
    import snntorch.surrogate as sg
    model = SpikingVGG(1, 2, base_channels=2, num_stages=1, blocks_per_stage=1, T=2, input_size=4,
                       spike_grad=sg.atan())
    assert not model.supports_twin_differences  # its surrogate states no derivative
    res = finite_difference_lyapunov(model, torch.rand(2, 3, 1, 4, 4))
    assert torch.isfinite(res.exponent)


def test_unroll_refuses_differences_for_a_stepper_without_them():
    model = SpikingMLP(3, [4], 2)
    twins = TwinLayout(2, torch.arange(2), differences=True)
    with pytest.raises(ValueError, match="twins: differences=True needs.*SpikingMLP"):
        unroll(model, torch.rand(3, 2, 3), twins=twins)
    vgg = SpikingVGG(1, 2, base_channels=2, num_stages=1, blocks_per_stage=1, T=2, input_size=4)
    bad = tuple(vgg.init_state(5, None, torch.float32)) * 2
    with pytest.raises(ValueError, match="state: expected 2 nominal tensors with 2 rows"):
        unroll(vgg, torch.rand(2, 2, 1, 4, 4), bad, twins=twins)


_CHAINS = {
    "linear": (lambda: [nn.Linear(6, 5)], (6,)),
    "conv": (lambda: [nn.Conv2d(3, 4, 3, padding=1, bias=False)], (3, 6, 6)),
    "strided conv with bias": (lambda: [nn.Conv2d(3, 2, 3, stride=2, padding=1)], (3, 6, 6)),
    "pool": (lambda: [nn.AvgPool2d(2)], (3, 6, 6)),
    "pool then conv": (lambda: [nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1, bias=False)], (3, 8, 8)),
    "conv then pool": (lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2)], (3, 8, 8)),
    "identity then conv": (lambda: [nn.Identity(), nn.Conv2d(3, 4, 3, padding=1, bias=False)], (3, 6, 6)),
}


@pytest.mark.parametrize("scaled", [False, True], ids=["", "scaled"])
@pytest.mark.parametrize("chain", list(_CHAINS))
def test_linear_difference_is_the_chains_linear_map_with_its_gradients(chain, scaled):
    """``A(delta) * scale`` against the modules themselves (bias removed), and every gradient
    (difference, weights, scale) by gradcheck; rows without flips are skipped in the products."""
    make, shape = _CHAINS[chain]
    modules = [m.double() for m in make()]
    delta = torch.randn(5, *shape, dtype=torch.float64)
    delta[1] = 0.0
    delta[3] = 0.0  # rows without flips
    delta.requires_grad_(True)
    nominal_outs, h = [], torch.zeros(2, *shape, dtype=torch.float64)
    for m in modules:
        h = m(h)
        nominal_outs.append(h)
    expected = delta
    for m in modules:
        expected = m(expected)
        if getattr(m, "bias", None) is not None:
            expected = expected - m.bias.view((1, -1) + (1,) * (expected.dim() - 2))
    channels = nominal_outs[-1].shape[1]
    scale = (torch.rand(channels, dtype=torch.float64) + 0.5).requires_grad_(True) if scaled else None
    if scaled:
        expected = expected * scale.view((1, -1) + (1,) * (expected.dim() - 2))
    out = LinearDifference(modules, delta, nominal_outs, nonzero_rows(delta), scale).tensor()
    assert nonzero_rows(delta).tolist() == [0, 2, 4]
    assert torch.allclose(out, expected, atol=1e-12)
    weights = [m.weight for m in modules if hasattr(m, "weight")]

    def run(d, s, *ws):
        it = iter(ws)
        chain_ = [_with_weight(m, next(it)) if hasattr(m, "weight") else m for m in modules]
        return LinearDifference(chain_, d, nominal_outs, nonzero_rows(d), s).tensor()
    torch.autograd.gradcheck(run, (delta, scale, *weights))


def test_linear_difference_of_a_zero_difference_is_zero_with_the_input_gradient():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    delta = torch.zeros(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.ones(4, dtype=torch.float64, requires_grad=True)
    out = LinearDifference([conv], delta, [conv(delta[:1])], nonzero_rows(delta), scale).tensor()
    assert not out.any()
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.autograd.grad(conv(delta), delta, g)[0]
    assert torch.allclose(delta.grad, expected) and delta.grad.abs().sum() > 0
    assert conv.weight.grad is None and scale.grad is None  # zero: nothing was multiplied


def _with_weight(layer, weight):
    clone = copy.copy(layer)
    clone.weight = weight
    return clone


def test_linear_difference_refuses_other_modules():
    with pytest.raises(TypeError, match="modules: expected nn.Linear.*got MaxPool2d"):
        LinearDifference([nn.MaxPool2d(2)], torch.zeros(1, 1, 2, 2), [torch.zeros(1, 1, 1, 1)],
                         torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_nominal_batch_norm_is_the_modules_forward_and_gives_its_statistics(momentum):
    a = nn.BatchNorm2d(3, momentum=momentum).train()
    b = copy.deepcopy(a)
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4) * 2 + 1
        out, invstd = batch_norm_nominal(a, x)
        assert torch.allclose(out, b(x), atol=1e-6)
        assert torch.allclose(invstd, torch.rsqrt(x.var((0, 2, 3), unbiased=False) + a.eps), rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(a, name).float(), getattr(b, name).float())
    a.eval()
    out, invstd = batch_norm_nominal(a, x)
    assert torch.allclose(invstd, torch.rsqrt(a.running_var + a.eps))


def test_differences_keep_float32_precision_where_twin_rows_lose_it(monkeypatch, recwarn):
    """A float32 twin row holds partner + delta at membrane scale (delta ~1e-6 per value loses
    bits); a difference carried as such does not: float32 equals the float64 estimate."""
    torch.manual_seed(0)
    model = SpikingVGG(3, 10, base_channels=8, num_stages=2, blocks_per_stage=1, T=6, input_size=16).eval()
    x = torch.rand(6, 8, 3, 16, 16)
    run = lambda **kw: finite_difference_lyapunov(model, x, eps=1e-4, generator=torch.Generator().manual_seed(0),
                                                  **kw).per_sample.detach()
    reference = run(twin_dtype=torch.float64)
    assert (run() - reference).abs().max() < 1e-5
    assert not [w for w in recwarn if "resolves" in str(w.message)]
    monkeypatch.setattr(SpikingVGG, "supports_twin_differences", property(lambda self: False))
    with pytest.warns(RuntimeWarning, match="resolves"):
        assert (run() - reference).abs().max() > 1e-4


def test_the_kernels_split_large_tensors_across_threads(monkeypatch):
    """Above native._PARALLEL_MIN_VALUES the LIF-difference kernel runs in chunks on several
    threads: the same values and gradients as the PyTorch operations."""
    from stablespike import native
    if native.kernel(torch.float32, "leaky_difference") is None:
        pytest.skip("no C compiler: the kernel could not be built")
    monkeypatch.setattr(native, "_PARALLEL_MIN_VALUES", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _compare_leaky_kernel_with_pytorch(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _compare_leaky_kernel_with_pytorch(monkeypatch):
    from stablespike.models.base import leaky
    from stablespike.twin_differences import leaky_difference
    lif = leaky(0.9, 1.0, None)
    twins = TwinLayout(5, torch.tensor([0, 3, 4]))
    g = torch.Generator().manual_seed(5)
    mem_prev, mem = torch.randn(5, 3001, generator=g) + 1, torch.randn(5, 3001, generator=g) + 1
    delta, current = 0.3 * torch.randn(3, 3001, generator=g), 0.3 * torch.randn(3, 3001, generator=g)
    delta[1], current[1] = 0.0, 0.0  # a twin that equals its partner: no flip in its row
    seeds = [torch.randn(3, 3001, generator=g) for _ in range(2)]
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("STABLESPIKE_NATIVE", env)
        leaves = [t.clone().requires_grad_(True) for t in (mem, delta, current)]
        *outs, flipped = leaky_difference(lif, mem_prev, leaves[0], leaves[1], leaves[2], twins)
        torch.autograd.backward(outs, seeds)
        assert flipped.tolist() == [0, 2] and flipped.tolist() == nonzero_rows(outs[1]).tolist()
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    assert results[0][1].abs().sum() > 0  # spikes flipped
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_taking_every_row_as_flipped_changes_nothing(monkeypatch):
    """What a GPU does (no data-dependent row choice): the products on all rows, same results."""
    import stablespike.twin_differences as td
    x = 2.0 * torch.rand(5, 6, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _vgg(True)
    other = copy.deepcopy(model)
    a, grads_a, _ = _estimate(model, x, True, monkeypatch, eps=0.3)
    monkeypatch.setattr(td, "nonzero_rows", lambda d: torch.arange(d.shape[0]))
    monkeypatch.setenv("STABLESPIKE_NATIVE", "0")  # the kernel finds the flipped rows itself
    b, grads_b, _ = _estimate(other, x, True, monkeypatch, eps=0.3)
    assert torch.allclose(a.per_sample, b.per_sample, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_hooks_on_the_vggs_modules_see_the_nominal_rows_only():
    model = SpikingVGG(1, 2, base_channels=2, num_stages=2, blocks_per_stage=1, T=3, input_size=8)
    seen = []
    for block in (model.stages[0][0], model.stages[1][0]):
        for module in (block.conv, block.bn, block.lif):
            module.register_forward_hook(lambda m, args, out: seen.append(
                (out[0] if isinstance(out, tuple) else out).shape[0]))
    finite_difference_lyapunov(model, torch.rand(3, 5, 1, 8, 8), fraction=0.4)
    assert len(seen) == 3 * 2 * 3 and set(seen) == {5}


def _lif_step_with_twins(with_spikes: bool, factor: float = 1.0):
    """One nominal snnTorch step and its twins' difference; the leaves and a loss on all four
    outputs (nominal spikes and membrane, membrane and spike differences)."""
    from stablespike.models.base import leaky
    from stablespike.twin_differences import leaky_difference
    lif = leaky(0.9, 1.0, None)
    lif.graded_spikes_factor.fill_(factor)
    twins = TwinLayout(6, torch.tensor([1, 2, 5]))
    g = torch.Generator().manual_seed(3)
    current, mem_prev = torch.randn(6, 400, generator=g) + 1, torch.randn(6, 400, generator=g) + 0.5
    delta, dcurrent = 0.3 * torch.randn(3, 400, generator=g), 0.3 * torch.randn(3, 400, generator=g)
    leaves = [t.requires_grad_(True) for t in (current, mem_prev, delta, dcurrent)]
    spk, mem = lif(current, mem_prev)
    dmem, dspk, _ = leaky_difference(lif, mem_prev, mem, delta, dcurrent, twins,
                                  spk if with_spikes else None)
    weights = [torch.randn(t.shape, generator=g) for t in (spk, mem, dmem, dspk)]
    loss = sum((w * t).sum() for w, t in zip(weights, (spk, mem, dmem, dspk)))
    return leaves, loss, dspk


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_the_partner_gradient_handed_to_the_surrogate_equals_the_scattered_one(factor):
    """Given the nominal spikes, the partners' gradient is added inside the surrogate's backward
    instead of through a zero-filled full-size tensor: the same gradients for every input."""
    reference_leaves, loss, dspk = _lif_step_with_twins(False, factor)
    assert bool(dspk.ne(0).any())  # some spikes flipped: the partner term is not zero
    reference = torch.autograd.grad(loss, reference_leaves)
    leaves, loss, _ = _lif_step_with_twins(True, factor)
    for a, b in zip(torch.autograd.grad(loss, leaves), reference):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_pass_that_skips_the_surrogate_leaves_no_partner_gradient_for_the_next():
    """autograd.grad asking only for the twins' own input does not run the nominal surrogate:
    the partner gradient must not wait there and be added in a later pass."""
    leaves, loss, _ = _lif_step_with_twins(True)
    torch.autograd.grad(loss, [leaves[3]], retain_graph=True)  # d loss / d dcurrent only
    later = torch.autograd.grad(loss, leaves)
    reference_leaves, reference_loss, _ = _lif_step_with_twins(False)
    reference = torch.autograd.grad(reference_loss, reference_leaves)
    for a, b in zip(later, reference):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_spike_node_finds_the_fast_sigmoid_behind_snntorchs_spike_factor():
    from stablespike.models.base import leaky
    from stablespike.surrogate import _FastSigmoidSpike, spike_node
    lif = leaky(0.9, 1.0, None)
    spk, mem = lif(torch.randn(2, 5, requires_grad=True), torch.zeros(2, 5))
    assert isinstance(spike_node(spk), _FastSigmoidSpike._backward_cls)
    assert spike_node(mem) is None  # a membrane is not a spike
    assert spike_node(spk.detach()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 7, 7), (1, 1, 2, 3)])
def test_the_average_pooling_gradient_kernel_is_pytorchs(shape, dtype):
    """The C kernel for the 2x2 pooling's input gradient against aten's avg_pool2d_backward
    (odd sizes: the last row or column lies in no window)."""
    from stablespike import native
    from stablespike.twin_differences import _PoolMap
    if native.function(dtype, "avg_pool2x2_backward") is None:
        pytest.skip("no C compiler: the kernel could not be built")
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = F.avg_pool2d(x, 2)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, x, g)[0]
    assert torch.equal(_PoolMap(nn.AvgPool2d(2)).input_grad(g, x.detach()), expected)
    assert torch.equal(_PoolMap(nn.AvgPool2d(2)).input_grad(g.transpose(2, 3).contiguous().transpose(2, 3),
                                                          x.detach()), expected)  # not contiguous


def test_spike_node_checks_which_membrane_the_spikes_came_from():
    """Spikes of another step (or layer) than the membrane given: no node, so the partner
    gradient takes the scattered route rather than landing on the wrong tensor."""
    from stablespike.models.base import leaky
    from stablespike.surrogate import spike_node
    lif = leaky(0.9, 1.0, None)
    x = torch.randn(2, 5, requires_grad=True)
    spk1, mem1 = lif(x, torch.zeros(2, 5))
    spk2, mem2 = lif(x, mem1)
    assert spike_node(spk2, mem2) is not None
    assert spike_node(spk2, mem1) is None and spike_node(spk1, mem2) is None
