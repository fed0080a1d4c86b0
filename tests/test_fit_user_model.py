"""``fit`` on a user's own snnTorch model (tutorial 5 as written: an explicit-membrane loop that
returns spike and membrane records) with the user's loss: it learns digits with and without the
Lyapunov penalty, its accuracy is the spike-count vote counted by hand, and a killed run resumes
to the uninterrupted one."""
import math

import pytest
import torch

from stablespike.data import load_dataset
from stablespike.train import TrainConfig, fit

SF = pytest.importorskip("snntorch.functional")
from user_models import snntorch_tutorial5  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").subset(train=512, test=256, seed=0)


def net():
    return snntorch_tutorial5(num_inputs=64, num_hidden=64, num_outputs=10, num_steps=6, weight_gain=2.0)


def forward(model, x):  # x (B, 1, 8, 8) as the data set holds it -> (spk_rec, mem_rec), each (T, B, 10)
    return model(x.flatten(1))


def loss(outputs, y):  # snnTorch's rate loss on the output spike record
    return SF.ce_rate_loss()(outputs[0], y)


def config(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 64, "lr": 5e-3, "lyap_eps": 1e-2, "lyap_fraction": 0.25,
                          "progress": False, **kw})


@pytest.mark.parametrize("penalty", [False, True])
def test_fit_trains_a_users_snntorch_model_with_its_own_loss(digits, penalty):
    model = net()
    result = fit(model, digits, config(lyapunov=penalty), forward=forward, loss=loss)
    assert result.status == "OK" and len(result.history) == 3
    assert result.history[-1].test_acc > 0.3  # chance is 0.1
    assert all(math.isfinite(m.train_loss) and 0 <= m.train_acc <= 1 for m in result.history)
    assert (result.history[-1].lyapunov is not None) == penalty
    with torch.no_grad():  # the accuracy: the class with the most output spikes, counted by hand
        spikes, _ = forward(model.eval(), digits.x_test)
        by_hand = float((spikes.sum(0).argmax(1) == digits.y_test).float().mean())
    assert result.history[-1].test_acc == pytest.approx(by_hand, abs=1e-9)


def test_a_killed_run_of_a_users_model_resumes_to_the_uninterrupted_one(digits, tmp_path, monkeypatch):
    import stablespike.train as train
    cfg = config(epochs=2, lyapunov=True)
    straight = net()
    fit(straight, digits, cfg, str(tmp_path / "straight"), forward=forward, loss=loss)
    original, calls = train._train_epoch, {"n": 0}

    def killed_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(net(), digits, cfg, str(tmp_path / "run"), forward=forward, loss=loss)
    monkeypatch.setattr(train, "_train_epoch", original)
    resumed_model = net()
    resumed = fit(resumed_model, digits, cfg, str(tmp_path / "run"), forward=forward, loss=loss)
    assert [m.epoch for m in resumed.history] == [1, 2]
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_bad_loss_is_named(digits):
    with pytest.raises(TypeError, match="loss: expected a function"):
        fit(net(), digits, config(epochs=1), forward=forward, loss="ce")
    with pytest.raises(ValueError, match="loss: expected it to return a scalar"):
        fit(net(), digits, config(epochs=1), forward=forward, loss=lambda out, y: out[0].sum(0))


def test_fit_writes_per_layer_rates_and_histograms_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    import stablespike as ss

    class AlwaysOn(nn.Module):  # a registered neuron type of the user's: fires at every step
        def forward(self, x):
            return x - x.detach() + 1.0

    class NeverOn(nn.Module):
        def forward(self, x):
            return x * 0.0

    data = load_dataset("digits").subset(train=128, test=64, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), AlwaysOn(), nn.Linear(6, 4), NeverOn(), nn.Linear(4, 10))
    for kind in (AlwaysOn, NeverOn):
        ss.register_neuron(kind)
    try:
        fit(model, data, config(epochs=2), str(tmp_path), forward=lambda m, x: m(x))
    finally:
        for kind in (AlwaysOn, NeverOn):
            ss.neurons.DEFAULT_REGISTRY.unregister(kind)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    scalar = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalar["firing_rate/2"] == [(1, 1.0), (2, 1.0)] and scalar["firing_rate/4"] == [(1, 0.0), (2, 0.0)]
    assert scalar["dead_fraction/4"] == [(1, 1.0), (2, 1.0)] and "test_acc" in scalar
    on = [e.histogram_value for e in events.Histograms("rate_histogram/2")]
    assert [h.num for h in on] == [6, 6] and list(on[0].bucket)[-1] == 6  # six neurons at rate 1
    assert all(len(m._forward_hooks) == 0 for m in model.modules())  # the profiler is gone
