"""The penalty benchmark's training steps run on small versions of its models (its seed-style
VGG loop once failed on a VGG whose input size is set lazily), and the seeds' reference loop gives
ln(beta) below threshold, as the engine does."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lyapunov_overhead as bench  # noqa: E402

from stablespike import LyapunovRegularizer, SpikingMLP, SpikingVGG  # noqa: E402


def _models():
    torch.manual_seed(0)
    return [(SpikingMLP(12, [16, 16], 3), torch.rand(4, 6, 12), torch.randint(0, 3, (4,))),
            (SpikingVGG(3, 3, base_channels=4, num_stages=2, blocks_per_stage=1, T=3, input_size=8),
             torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,)))]


@pytest.mark.parametrize("variant", list(bench.VARIANTS) + ["seed-style"] + list(bench.MORE_SAMPLES))
def test_every_variant_of_the_benchmark_step_trains(variant):
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1)
    for model, x, y in _models():
        before = [p.detach().clone() for p in model.parameters()]
        bench.make_step(model, x, y, variant, reg)()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_the_seed_style_loop_is_seed_001s_below_threshold():
    """Below threshold every step scales the twin difference by beta; seed 001 perturbs by
    eps * randn per value (norm eps * |r| per sample, not eps), so its first step also counts
    ln |r|: the exponent is ln(beta) + mean_b ln|r_b| / T with r the loop's own draw."""
    torch.manual_seed(1)
    model = SpikingMLP(12, [16, 16], 3, beta=0.8, threshold=100.0)  # never spikes
    x, T = torch.rand(4, 6, 12), 6
    torch.manual_seed(2)
    _, lam = bench.seed_style_forward(model, x, 1e-3)
    torch.manual_seed(2)
    r = torch.cat([torch.randn(4, h) for h in model.hidden_dims], dim=1)
    want = math.log(0.8) + float(r.norm(dim=1).log().mean()) / T
    assert abs(float(lam.detach()) - want) < 1e-4


def test_more_samples_appends_copies_along_the_batch_dimension():
    x, y = torch.arange(2 * 16.0).view(2, 16), torch.arange(16)  # (T, B)
    x1, y1 = bench.with_more_samples(x, y, 0.125, batch_dim=1)
    assert x1.shape == (2, 18) and torch.equal(x1[:, 16:], x[:, :2]) and y1.tolist() == list(range(16)) + [0, 1]
    x2, y2 = bench.with_more_samples(x.T, y, 1.0, batch_dim=0)
    assert x2.shape == (32, 2) and torch.equal(x2[16:], x.T) and len(y2) == 32
