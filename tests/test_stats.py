"""Streaming statistics against hand counts and whole-data computations."""
import pytest
import torch

from stablespike import FiringRate, GradNorm, MembraneStats


def known_spikes():
    # T=4 steps, B=2 samples, N=3 neurons; neuron 0 fires 2 of 8 times, neuron 1 8 of 8, neuron 2 never
    s = torch.zeros(4, 2, 3)
    s[0, 0, 0] = s[3, 1, 0] = 1
    s[:, :, 1] = 1
    return s


def test_firing_rate_is_a_hand_count_in_both_layouts():
    s = known_spikes()
    multi = FiringRate()
    multi.update(s, multistep=True)
    single = FiringRate()
    for t in range(4):
        single.update(s[t])  # (B, N), one step per call
    for acc in (multi, single):
        assert acc.compute().tolist() == [2 / 8, 1.0, 0.0]
        assert acc.count == 8
    assert multi.mean() == pytest.approx((0.25 + 1.0) / 3)


def test_batch_is_averaged_not_summed():
    acc = FiringRate()
    g = torch.Generator().manual_seed(0)
    acc.update((torch.rand(64, 1000, generator=g) < 0.02).float())  # B=64 at true rate 0.02
    assert acc.mean() == pytest.approx(0.02, abs=0.002)


def test_merge_of_two_halves_equals_the_whole():
    g = torch.Generator().manual_seed(1)
    spikes = (torch.rand(10, 8, 5, generator=g) < 0.3).float()
    volts = torch.randn(10, 8, 5, generator=g) * 3 + 1
    grads = [torch.randn(8, 5, generator=g) for _ in range(6)]
    whole_r, a_r, b_r = FiringRate(), FiringRate(), FiringRate()
    whole_m, a_m, b_m = MembraneStats(), MembraneStats(), MembraneStats()
    whole_g, a_g, b_g = GradNorm(), GradNorm(), GradNorm()
    whole_r.update(spikes, multistep=True)
    whole_m.update(volts, multistep=True)
    a_r.update(spikes[:3], multistep=True)
    b_r.update(spikes[3:], multistep=True)
    a_m.update(volts[:7], multistep=True)
    for t in range(7, 10):
        b_m.update(volts[t])
    for i, gr in enumerate(grads):
        whole_g.update(gr)
        (a_g if i < 2 else b_g).update(gr)
    assert torch.allclose(a_r.merge(b_r).compute(), whole_r.compute())
    merged, whole = a_m.merge(b_m).compute(), whole_m.compute()
    for key in ("mean", "std", "min", "max"):
        assert torch.allclose(merged[key], whole[key])
    v = volts.double().flatten(0, 1)
    assert torch.allclose(whole["std"], v.std(0, unbiased=False))
    assert a_g.merge(b_g).compute() == pytest.approx(whole_g.compute())
    assert whole_g.compute()["max"] == pytest.approx(max(float(x.norm()) for x in grads))


def test_bounded_state_and_clear_errors():
    acc = FiringRate()
    for _ in range(50):
        acc.update(torch.ones(16, 7))
    acc.update(torch.ones(3, 7))  # a smaller last batch
    assert acc.compute().tolist() == [1.0] * 7 and acc.count == 16 * 50 + 3
    assert acc.spike_sum.shape == (7,)  # O(neurons) totals, whatever the number of updates
    with pytest.raises(ValueError, match=r"neurons of shape \(7,\)"):
        acc.update(torch.ones(16, 8))
    with pytest.raises(ValueError, match=r"\(T, B, \.\.\.\)"):
        FiringRate().update(torch.ones(5), multistep=True)
    with pytest.raises(RuntimeError, match="update first"):
        MembraneStats().compute()
    acc.reset()
    assert acc.count == 0 and acc.spike_sum is None and acc._buffer is None


def test_membrane_stats_match_the_whole_data_and_detect_a_constant_membrane():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(300, 6, 4, generator=g) * 0.5 + 3.0  # 300 steps: crosses a flush boundary
    acc = MembraneStats()
    for t in range(300):
        acc.update(v[t])
    acc.update(v[:5], multistep=True)  # and a multi-step update on top
    allv = torch.cat([v, v[:5]]).double().flatten(0, 1)
    stats = acc.compute()
    assert torch.allclose(stats["mean"], allv.mean(0), atol=1e-6)
    assert torch.allclose(stats["std"], allv.std(0, unbiased=False), atol=1e-6)
    assert torch.equal(stats["min"], allv.amin(0)) and torch.equal(stats["max"], allv.amax(0))
    flat = MembraneStats()
    for _ in range(20):
        flat.update(torch.full((8, 3), 0.7312))
    assert flat.compute()["std"].max() == 0.0  # exactly: voltage collapse must stay detectable
