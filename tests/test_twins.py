"""The twins' renormalization against the same arithmetic written as plain operations."""
import math

import pytest
import torch

from stablespike.twins import TwinEstimate, TwinRows, renormalized


def reference(states, index, batch, groups, target):
    """Twin <- sample + d * target / |d| per group, with plain operations."""
    part = [s[:batch] if index is None else s[index] for s in states]
    diffs = [s[batch:] - p for s, p in zip(states, part)]
    sq = torch.stack([sum(d.pow(2).flatten(1).sum(1) for d, gg in zip(diffs, groups) if gg == g)
                      for g in range(max(groups) + 1)])
    new = [torch.cat([s[:batch], p + d * (target / sq[g].sqrt()).view(-1, *[1] * (d.dim() - 1))])
           for s, p, d, g in zip(states, part, diffs, groups)]
    return new + [sq]


CASES = [  # (shapes per state, batch, index, groups, target)
    ([(5, 3), (5, 2, 2)], 3, torch.tensor([0, 2]), (0, 0), 0.1),           # sub-batch, global
    ([(6, 4), (6, 3)], 3, None, (0, 1), 0.1 / math.sqrt(2)),               # all rows, per layer
    ([(7, 2)], 4, torch.tensor([1, 1, 3]), (0,), 1e-3),                     # a repeated sample
]


@pytest.mark.parametrize("shapes, batch, index, groups, target", CASES)
def test_values_and_gradients_equal_plain_operations(shapes, batch, index, groups, target):
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    got = renormalized(states, index, batch, groups, target)
    want = reference(states, index, batch, groups, target)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)
    weights = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    ga = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weights)), states)
    gb = torch.autograd.grad(sum((b * w).sum() for b, w in zip(want, weights)), states)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *s: tuple(renormalized(s, index, batch, groups, target)), tuple(states))


def test_a_twin_on_its_sample_stays_there_with_finite_gradients():
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)  # one sample, its twin equal
    new, sq = renormalized([s], None, 1, (0,), 0.1)
    assert torch.equal(new.detach(), s.detach()) and float(sq.detach()) == 0.0
    new.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_the_estimate_records_the_distance_before_and_puts_twins_at_eps():
    rows = TwinRows(2, torch.tensor([1]))
    est = TwinEstimate(rows, eps=0.5, renorm="per_layer", groups=2)
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 5.0]])  # twin of sample 1 at distance 5
    b = torch.tensor([[0.0], [2.0], [2.0]])                  # at distance 0
    new_a, new_b = est.renormalize(0, [a, b], [0, 1])
    assert torch.allclose(new_a[2], torch.tensor([1.0, 1.0]) + 0.5 / math.sqrt(2) * torch.tensor([0.6, 0.8]))
    assert torch.equal(new_b[2], b[2])
    assert float(est._sq[0][0]) == 25.0 and float(est._sq[0][1]) == 0.0


def test_the_inverse_std_node_equals_plain_operations():
    from stablespike.sharing import _InverseStd
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    plain = torch.rsqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    assert torch.allclose(_InverseStd.apply(x, 1e-5), plain)
    assert torch.autograd.gradcheck(lambda t: _InverseStd.apply(t, 1e-5), (x,), check_forward_ad=True)


@pytest.mark.parametrize("affine", [True, False])
def test_the_shared_batch_norm_node_equals_plain_operations(affine):
    """All rows normalized with the statistics of the first 3 of each block of 5."""
    from stablespike.sharing import _SharedBatchNorm
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True) if affine else None
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True) if affine else None
    nominal = blocks[:, :3]
    mean = nominal.mean(dim=(0, 1, 3), keepdim=True)
    var = (nominal - mean).square().mean(dim=(0, 1, 3), keepdim=True)
    plain = (blocks - mean) / torch.sqrt(var + 1e-5)
    if affine:
        plain = plain * w.view(1, 1, 3, 1) + b.view(1, 1, 3, 1)
    out = _SharedBatchNorm.apply(blocks, w, b, 3, 1e-5)[0]
    assert torch.allclose(out, plain, atol=1e-10)
    inputs = (blocks, w, b) if affine else (blocks,)
    fn = (lambda x, ww, bb: _SharedBatchNorm.apply(x, ww, bb, 3, 1e-5)[0]) if affine else \
        (lambda x: _SharedBatchNorm.apply(x, None, None, 3, 1e-5)[0])
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("index, dim", [(None, 0), (torch.tensor([2, 0, 2]), 1)])
def test_appending_copies_has_the_gradients_of_cat_and_index_select(index, dim):
    """TwinRows.extend's node against cat([x, x[index]]) written as plain operations: values,
    gradients (reverse and forward mode) by gradcheck."""
    rows = TwinRows(3, torch.arange(3) if index is None else index)
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    plain = torch.cat([x, x if index is None else x.index_select(dim, index)], dim=dim)
    assert torch.equal(rows.extend(x, dim=dim), plain)
    assert torch.autograd.gradcheck(lambda t: rows.extend(t, dim=dim), (x,), check_forward_ad=True)
