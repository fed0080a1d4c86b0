"""Seed models: seed signatures, shapes, snnTorch agreement, twin sharing of batch norm and dropout."""
import copy

import pytest
import snntorch as snn
import torch

from stablespike import (LyapunovSNN, RecurrentLyapunovSNN, SpikingMLP, SpikingVGG, create_snn,
                         fast_sigmoid)
from stablespike.dynamics import unroll


def test_seed_signatures_of_all_three_models():
    x = torch.rand(4, 6, 10) * 2  # (B, T, D) batch-first, as seed 001
    mlp = LyapunovSNN(10, [32, 16], 3, 0.9, 1.0, fast_sigmoid(25), 0.1)
    logits, lyap, rec = mlp(x, True, 1e-3, [0, -1], True)
    assert logits.shape == (4, 3) and lyap.dim() == 0
    assert rec["spikes"].shape == (4, 6, 16) and rec["membrane"].shape == (4, 6, 16)
    assert [t.shape for t in rec["layer_membranes"]] == [(4, 6, 32), (4, 6, 16)]
    rnn = RecurrentLyapunovSNN(10, [24], 5, 0.9, 0.85, 1.0)
    logits, lyap, rec = rnn(x, compute_lyapunov=True, lyap_eps=1e-3)
    assert logits.shape == (4, 5) and torch.isfinite(lyap) and rec is None
    vgg = SpikingVGG(3, 10, 8, 2, 1, 2, 0.9, 1.0, 0.25, True)
    logits, lyap, rec = vgg(torch.rand(2, 3, 32, 32), compute_lyapunov=True, lyap_eps=1e-3)
    assert logits.shape == (2, 10) and torch.isfinite(lyap)
    assert isinstance(create_snn("feedforward", 10, [8], 2), SpikingMLP)
    assert isinstance(create_snn("recurrent", 10, [8], 2, alpha=0.8), RecurrentLyapunovSNN)
    with pytest.raises(ValueError, match="feedforward, recurrent"):
        create_snn("convolutional", 10, [8], 2)


def test_without_lyapunov_returns_none_and_same_logits():
    torch.manual_seed(0)
    model = SpikingMLP(10, [32, 32], 3, threshold=0.5).eval()
    x = torch.rand(4, 8, 10) * 2
    plain, lyap, rec = model(x)
    with_lyap, est, _ = model(x, compute_lyapunov=True)
    assert lyap is None and rec is None and est is not None
    assert torch.equal(plain, with_lyap)  # the twin does not touch the nominal trajectory


def test_mlp_matches_a_plain_snntorch_loop():
    torch.manual_seed(1)
    model = SpikingMLP(10, [32, 16], 3, threshold=0.5).eval()
    x = torch.rand(4, 8, 10) * 2
    logits, _, rec = model(x, record_states=True)
    # the loop a snnTorch user writes, with fresh Leaky neurons carrying the same parameters
    lifs = [snn.Leaky(beta=0.9, threshold=0.5, spike_grad=fast_sigmoid(25)) for _ in range(2)]
    mems = [torch.zeros(4, 32), torch.zeros(4, 16)]
    total = torch.zeros(4, 16)
    for t in range(8):
        h = x[:, t]
        for i in range(2):
            h, mems[i] = lifs[i](model.linears[i](h), mems[i])
        total += h
    assert torch.allclose(logits, model.readout(total))
    assert torch.equal(rec["spikes"].sum(1), total)


def test_recurrent_matches_a_plain_snntorch_loop():
    torch.manual_seed(2)
    model = RecurrentLyapunovSNN(6, [12], 2, threshold=0.5).eval()
    x = torch.rand(3, 7, 6) * 2
    logits, _, _ = model(x)
    neuron = model.neurons[0]
    spk, syn, mem = (torch.zeros(3, 12) for _ in range(3))
    total = torch.zeros(3, 12)
    for t in range(7):
        spk, syn, mem = neuron(model.linears[0](x[:, t]), spk, syn, mem)
        total += spk
    assert torch.allclose(logits, model.readout(total))


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 8), (1, 28), (3, 28), (1, 32), (3, 32)])
def test_vgg_infers_shapes_from_the_input(channels, size):
    model = SpikingVGG.for_input((channels, size, size), num_classes=7, base_channels=4,
                                 num_stages=4, blocks_per_stage=1, T=2)
    logits, lyap, rec = model(torch.rand(2, channels, size, size), compute_lyapunov=True,
                              lyap_eps=1e-3, record_states=True)
    assert logits.shape == (2, 7) and torch.isfinite(lyap)
    assert rec["layer_membranes"][0].shape == (2, 2, 4, size, size)
    assert len(rec["layer_spikes"]) == 4


def test_vgg_channel_cap_and_depth():
    model = SpikingVGG(3, 10, base_channels=256, num_stages=3, blocks_per_stage=2, input_size=8)
    assert model.depth == 6
    assert [b.conv.out_channels for s in model.stages for b in s] == [256, 256, 512, 512, 512, 512]


def assert_same_batch_norm_statistics(a, b):
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, torch.nn.BatchNorm2d):
            assert mb.running_mean.dtype == ma.running_mean.dtype
            assert torch.allclose(ma.running_mean, mb.running_mean, atol=1e-6)
            assert torch.allclose(ma.running_var, mb.running_var, atol=1e-5)
            assert int(ma.num_batches_tracked) == int(mb.num_batches_tracked)


def test_vgg_twins_share_batch_norm_statistics():
    torch.manual_seed(3)
    a = SpikingVGG(1, 4, base_channels=4, num_stages=2, blocks_per_stage=2, T=3, input_size=8,
                   dropout=0.0).train()
    b = copy.deepcopy(a)
    x = torch.rand(4, 1, 8, 8) * 3
    la, _, _ = a(x)
    lb, lyap, _ = b(x, compute_lyapunov=True, lyap_eps=1e-3)
    assert_same_batch_norm_statistics(a, b)
    assert torch.allclose(la, lb, atol=1e-5)  # the twins leave the nominal trajectory alone


def test_models_do_not_grow_snntorch_instance_list():
    before = len(snn.SpikingNeuron.instances)
    for _ in range(3):
        SpikingMLP(4, [8, 8], 2)
        RecurrentLyapunovSNN(4, [8], 2)
        SpikingVGG(1, 2, 4, 1, 1, input_size=4)
    assert len(snn.SpikingNeuron.instances) == before


@pytest.mark.parametrize("x, match", [
    (torch.rand(4, 10), "3-D"),
    (torch.rand(4, 6, 11), "input_dim=10"),
    (torch.rand(0, 6, 10), "empty"),
    (torch.full((4, 6, 10), float("nan")), "NaN"),
])
def test_sequence_models_reject_bad_input(x, match):
    for model in (SpikingMLP(10, [8], 2), RecurrentLyapunovSNN(10, [8], 2)):
        with pytest.raises(ValueError, match=match):
            model(x)


def test_vgg_rejects_wrong_image_shape_and_bad_config():
    model = SpikingVGG(3, 10, 4, 2, 1, input_size=32)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="num_stages"):
        SpikingVGG(num_stages=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        SpikingMLP(4, [], 2)
    with pytest.raises(ValueError, match="dropout"):
        SpikingMLP(4, [8], 2, dropout=1.0)


def test_float64_twins_keep_float32_model_and_its_batch_norm_statistics():
    torch.manual_seed(5)
    a = SpikingVGG(1, 4, base_channels=4, num_stages=2, blocks_per_stage=1, T=3, input_size=8,
                   dropout=0.0).train()
    b = copy.deepcopy(a)
    x = torch.rand(4, 1, 8, 8) * 3
    la, _, _ = a(x)
    lb, lyap, _ = b(x, compute_lyapunov=True, lyap_eps=1e-6, lyap_dtype=torch.float64)
    assert lb.dtype == torch.float32 and lyap.dtype == torch.float32
    assert torch.allclose(la, lb, atol=1e-4)
    assert_same_batch_norm_statistics(a, b)
    lyap.backward()
    grad = b.stages[1][0].conv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_seed_signature_vgg_takes_any_image_size_with_the_logits_of_for_input(channels, size):
    kw = dict(num_classes=10, base_channels=8, num_stages=3, blocks_per_stage=1, T=2, dropout=0.0)
    torch.manual_seed(0)
    model = SpikingVGG(in_channels=channels, **kw)  # seed 002's signature: no size given
    x = 3 * torch.rand(4, channels, size, size)
    logits = model(x)[0]
    reference = SpikingVGG.for_input((channels, size, size), **kw)
    reference.load_state_dict(model.state_dict())
    assert logits.abs().sum() > 0  # not a silent network, where any two models agree
    assert torch.equal(reference(x)[0], logits)
    # the readout's size follows the pooling rule: each stage halves H and W while both are >= 2
    h = size
    for _ in range(3):
        h = h // 2 if h >= 2 else h
    assert model.fc.weight.shape == (10, 32 * h * h)


def test_vgg_refuses_a_second_image_size_and_empty_images_naming_the_size():
    model = SpikingVGG(in_channels=1, num_classes=2, base_channels=4, num_stages=2, blocks_per_stage=1)
    model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"size \(H, W\) = \(28, 28\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"size \(H, W\) = \(0, 8\)"):
        SpikingVGG(in_channels=1, num_classes=2)(torch.rand(2, 1, 0, 8))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.rand(2, 3, 28, 28))
