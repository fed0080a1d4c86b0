"""The fused renormalization node: its hand-written backward against autograd's numerical gradient,
and its values against the same computation written with plain tensor operations; the C kernel
(in place on the CPU) against the PyTorch operations."""
import shutil

import pytest
import torch

from stablespike import SpikingMLP
from stablespike.dynamics import TwinLayout
from stablespike import native
from stablespike.lyapunov import finite_difference_lyapunov
from stablespike.lyapunov.renorm import Renormalizer

HAS_COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    """Run a test with the C kernel, then with the PyTorch operations."""
    if request.param == "native" and native.kernel(torch.float64) is None:
        pytest.skip("no C compiler: the kernel could not be built")
    monkeypatch.setenv("STABLESPIKE_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def layouts():
    return [TwinLayout(3, torch.arange(3)), TwinLayout(4, torch.tensor([0, 2]))]


@pytest.mark.parametrize("inplace", [False, True], ids=["new tensors", "in place"])
@pytest.mark.parametrize("twins", layouts(), ids=["all rows", "sub-batch"])
@pytest.mark.parametrize("groups", [[(0, 1, 2)], [(0,), (1, 2)]], ids=["global", "per-layer"])
def test_backward_matches_numerical_gradient(twins, groups, inplace, path):
    g = torch.Generator().manual_seed(0)
    rows = twins.batch + twins.twins
    states = [torch.randn(rows, *shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in [(5,), (2, 3), (4,)]]

    def f(*s):
        s = [x * 1.0 for x in s]  # non-leaf copies, so that the in-place variant may write them
        norm, new = Renormalizer(twins, groups, 0.3, inplace)(s)
        return (norm, *new)

    assert torch.autograd.gradcheck(f, states, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True], ids=["new tensors", "in place"])
@pytest.mark.parametrize("twins", layouts(), ids=["all rows", "sub-batch"])
def test_values_match_plain_operations(twins, inplace, path):
    g = torch.Generator().manual_seed(1)
    rows = twins.batch + twins.twins
    states = [torch.randn(rows, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    diffs = [s[twins.batch:] - s[twins.index] for s in states]
    expected_norm = torch.sqrt(sum(d.pow(2).sum(1) for d in diffs))
    states, originals = [s.clone() for s in states], states
    norm, new = Renormalizer(twins, [(0, 1)], 0.5, inplace)(states)
    states = originals
    assert torch.allclose(norm, expected_norm)
    for s, d, n in zip(states, diffs, new):
        assert torch.equal(n[: twins.batch], s[: twins.batch])  # nominal rows untouched
        assert torch.allclose(n[twins.batch:], s[twins.index] + d * (0.5 / expected_norm)[:, None])
    after = torch.sqrt(sum((n[twins.batch:] - n[twins.index]).pow(2).sum(1) for n in new))
    assert torch.allclose(after, torch.full_like(after, 0.5))


def test_in_place_update_is_refused_when_autograd_saved_the_state():
    twins = TwinLayout(2, torch.arange(2))
    x = torch.randn(4, 3, requires_grad=True)
    state = x * 1.0
    saved = state.pow(2)  # pow saves its input for backward
    norm, (new,) = Renormalizer(twins, [(0,)], 0.1, inplace=True)([state])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + new.sum() + norm.sum()).backward()


def test_the_kernel_builds_where_there_is_a_compiler():
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    assert native.kernel(torch.float32) is not None and native.kernel(torch.float64) is not None
    assert native.kernel(torch.float16) is None  # half precision takes the PyTorch operations


def _run(twins, groups, states, grads, g_total, env, monkeypatch):
    """Values and input gradients of one in-place renormalization, with STABLESPIKE_NATIVE=env."""
    monkeypatch.setenv("STABLESPIKE_NATIVE", env)
    leaves = [s.clone().requires_grad_(True) for s in states]
    copies = [x * 1.0 for x in leaves]
    norm, new = Renormalizer(twins, groups, 0.2, inplace=True)(copies)
    outputs = [norm] + [n for n, g in zip(new, grads) if g is not None]
    seeds = [g_total] + [g for g in grads if g is not None]
    kept = [(o, g) for o, g in zip(outputs, seeds) if g is not None]
    torch.autograd.backward([o for o, _ in kept], [g for _, g in kept])
    return [norm.detach()] + [n.detach() for n in new], [x.grad for x in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("twins", layouts(), ids=["all rows", "sub-batch"])
@pytest.mark.parametrize("groups", [[(0, 1, 2)], [(0, 2), (1,)]], ids=["global", "per-layer"])
@pytest.mark.parametrize("seeded", ["all", "no norm gradient", "one state without gradient"])
def test_kernel_equals_pytorch_operations(twins, groups, dtype, tol, seeded, monkeypatch):
    if native.kernel(dtype) is None:
        pytest.skip("no C compiler: the kernel could not be built")
    g = torch.Generator().manual_seed(2)
    rows = twins.batch + twins.twins
    states = [torch.randn(rows, *shape, generator=g, dtype=dtype) for shape in [(7,), (2, 3, 4), (5,)]]
    grads = [torch.randn(s.shape, generator=g, dtype=dtype) for s in states]
    g_total = None if seeded == "no norm gradient" else torch.randn(twins.twins, generator=g, dtype=dtype)
    if seeded == "one state without gradient":
        grads[1] = None
    fast = _run(twins, groups, states, grads, g_total, "1", monkeypatch)
    reference = _run(twins, groups, states, grads, g_total, "0", monkeypatch)
    for a, b in zip(fast[0] + fast[1], reference[0] + reference[1]):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_estimate_and_gradient_are_the_same_with_and_without_the_kernel(monkeypatch):
    if native.kernel(torch.float64) is None:
        pytest.skip("no C compiler: the kernel could not be built")
    torch.manual_seed(0)
    model = SpikingMLP(6, [9, 8, 7], 3).double()
    x = 2.0 * torch.rand(12, 10, 6, dtype=torch.float64)
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("STABLESPIKE_NATIVE", env)
        model.zero_grad()
        res = finite_difference_lyapunov(model, x, eps=1e-3, fraction=0.5,
                                         generator=torch.Generator().manual_seed(1))
        res.exponent.backward()
        results.append((res.per_sample.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                  for p in model.parameters()]))
    (lam_a, grads_a), (lam_b, grads_b) = results
    assert torch.allclose(lam_a, lam_b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_without_a_working_compiler_the_pytorch_operations_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    monkeypatch.setenv("STABLESPIKE_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.kernel(torch.float32) is None
        twins = TwinLayout(3, torch.arange(3))
        norm, (new,) = Renormalizer(twins, [(0,)], 0.5, inplace=True)([torch.randn(6, 4)])
        assert torch.allclose((new[3:] - new[:3]).norm(dim=1), torch.full((3,), 0.5))
        assert list(tmp_path.iterdir()) == []  # the failed build left nothing behind
    finally:
        native._library.cache_clear()


def test_a_compiler_that_cannot_target_this_cpu_builds_for_the_baseline(monkeypatch, tmp_path):
    """The kernels are built for the CPU's own vector instructions where the compiler can, for
    the baseline where it cannot; machines with other instruction sets get other files."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("STABLESPIKE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_NATIVE_ARCH", ["-mno-such-instruction-set"])
    native._library.cache_clear()
    try:
        assert native.kernel(torch.float32) is not None
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1
        native._library.cache_clear()
        monkeypatch.setattr(native, "_cpu_signature", lambda: "another-cpu")
        assert native.kernel(torch.float32) is not None
        assert len(list(tmp_path.iterdir())) == 2  # not the other machine's file
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("groups", [[(0, 1)], [(0,), (1,)]], ids=["global", "per-layer"])
def test_kernel_on_differences_equals_pytorch_operations(dtype, tol, groups, monkeypatch):
    """Twins carried as differences (K rows, no partner rows): rescaled into new tensors."""
    if native.kernel(dtype) is None:
        pytest.skip("no C compiler: the kernel could not be built")
    twins = TwinLayout(5, torch.tensor([0, 2, 4]), differences=True)
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(3, *shape, generator=g, dtype=dtype) for shape in [(4,), (2, 3)]]
    seeds = [torch.randn(3, generator=g, dtype=dtype)] + [torch.randn(d.shape, generator=g, dtype=dtype)
                                                           for d in deltas]
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("STABLESPIKE_NATIVE", env)
        leaves = [d.clone().requires_grad_(True) for d in deltas]
        norm, new = Renormalizer(twins, groups, 0.3)(leaves)
        torch.autograd.backward([norm] + new, seeds)
        assert all(n is not x for n, x in zip(new, leaves))  # new tensors, not rewritten
        results.append([norm.detach()] + [n.detach() for n in new] + [x.grad for x in leaves])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    for group in groups:  # each group rescaled to the target
        after = torch.sqrt(sum(results[0][1 + j].flatten(1).pow(2).sum(1) for j in group))
        assert torch.allclose(after, torch.full_like(after, 0.3), rtol=tol)


@pytest.mark.parametrize("groups", [[(0, 1)], [(0,), (1,)]], ids=["global", "per-layer"])
def test_differences_backward_matches_numerical_gradient(groups, path):
    twins = TwinLayout(6, torch.tensor([1, 2, 5]), differences=True)
    g = torch.Generator().manual_seed(6)
    deltas = [torch.randn(3, *shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in [(4,), (2, 3)]]

    def f(*d):
        norm, new = Renormalizer(twins, groups, 0.3)(list(d))
        return (norm, *new)

    assert torch.autograd.gradcheck(f, deltas, eps=1e-6, atol=1e-7)


def test_an_unusable_cache_directory_means_the_pytorch_operations(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("STABLESPIKE_CACHE", str(blocker / "cache"))
    native._library.cache_clear()
    try:
        assert native.kernel(torch.float32) is None
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["C kernel", "PyTorch"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward only", "with backward"])
def test_an_estimate_leaves_no_reference_cycles(kernel, backward, monkeypatch):
    """An autograd node that kept its own output as an attribute formed a cycle (output ->
    node -> output) that held the whole graph, saved activations included, until Python's cycle
    collector ran: a loop of forward passes grew to gigabytes. Nothing is left for it now."""
    import gc
    from stablespike import RecurrentSpikingMLP, SpikingVGG
    monkeypatch.setenv("STABLESPIKE_NATIVE", kernel)
    cases = [(SpikingVGG(1, 2, base_channels=2, num_stages=2, blocks_per_stage=1, T=3, input_size=8),
              torch.rand(3, 4, 1, 8, 8)),
             (SpikingMLP(6, [5, 5], 2), torch.rand(5, 4, 6)),
             (RecurrentSpikingMLP(6, [5, 5], 2), torch.rand(5, 4, 6))]
    for model, x in cases:
        for fraction, renorm in ((1.0, "global"), (0.5, "per_layer")):
            finite_difference_lyapunov(model, x, fraction=fraction, renorm=renorm)  # warm caches
            gc.collect()
            gc.disable()
            try:
                result = finite_difference_lyapunov(model, x, fraction=fraction, renorm=renorm)
                if backward:
                    result.exponent.backward()
                del result
                assert gc.collect() == 0, (type(model).__name__, fraction, renorm)
            finally:
                gc.enable()
