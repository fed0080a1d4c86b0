"""The fused renormalization node: its hand-written backward against autograd's numerical gradient,
and its values against the same computation written with plain tensor operations."""
import pytest
import torch

from stablespike.dynamics import TwinLayout
from stablespike.lyapunov.renorm import renormalize


def layouts():
    return [TwinLayout(3, torch.arange(3)), TwinLayout(4, torch.tensor([0, 2]))]


@pytest.mark.parametrize("inplace", [False, True], ids=["new tensors", "in place"])
@pytest.mark.parametrize("twins", layouts(), ids=["all rows", "sub-batch"])
@pytest.mark.parametrize("groups", [[(0, 1, 2)], [(0,), (1, 2)]], ids=["global", "per-layer"])
def test_backward_matches_numerical_gradient(twins, groups, inplace):
    g = torch.Generator().manual_seed(0)
    rows = twins.batch + twins.twins
    states = [torch.randn(rows, *shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in [(5,), (2, 3), (4,)]]

    def f(*s):
        s = [x * 1.0 for x in s]  # non-leaf copies, so that the in-place variant may write them
        norm, new = renormalize(twins, groups, 0.3, s, inplace=inplace)
        return (norm, *new)

    assert torch.autograd.gradcheck(f, states, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True], ids=["new tensors", "in place"])
@pytest.mark.parametrize("twins", layouts(), ids=["all rows", "sub-batch"])
def test_values_match_plain_operations(twins, inplace):
    g = torch.Generator().manual_seed(1)
    rows = twins.batch + twins.twins
    states = [torch.randn(rows, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    diffs = [s[twins.batch:] - s[twins.index] for s in states]
    expected_norm = torch.sqrt(sum(d.pow(2).sum(1) for d in diffs))
    states, originals = [s.clone() for s in states], states
    norm, new = renormalize(twins, [(0, 1)], 0.5, states, inplace=inplace)
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
    norm, (new,) = renormalize(twins, [(0,)], 0.1, [state], inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + new.sum() + norm.sum()).backward()
