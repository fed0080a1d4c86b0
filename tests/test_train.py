"""The fit loop: learns digits, resumes after an interruption, records divergence."""
import json
import os

import pytest
import torch

from stablespike import SpikingMLP
from stablespike.data import load_dataset
from stablespike.train import TrainConfig, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def config(**kw):
    base = dict(epochs=3, batch_size=64, T=6, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_lowers_the_loss_on_digits_with_the_regularizer(digits):
    torch.manual_seed(0)
    model = SpikingMLP(64, [96, 96], 10)
    result = fit(model, digits, config(lyapunov=True, lyap_fraction=0.25, lyap_eps=1e-2))
    losses = [m.train_loss for m in result.history]
    assert result.status == "OK" and losses[-1] < 0.5 * losses[0]
    assert result.history[-1].test_acc > 0.8
    assert all(m.lyapunov is not None and m.grad_norm > 0 for m in result.history)


def test_an_interrupted_run_resumes_where_it_stopped(digits, tmp_path, monkeypatch):
    import stablespike.train as train
    torch.manual_seed(1)
    initial = SpikingMLP(64, [64], 10).state_dict()

    def fresh():
        model = SpikingMLP(64, [64], 10)
        model.load_state_dict(initial)
        return model

    straight = fit(fresh(), digits, config(epochs=4), str(tmp_path / "straight"))
    original, calls = train._train_epoch, {"n": 0}

    def killed_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), digits, config(epochs=4), str(tmp_path / "run"))
    monkeypatch.setattr(train, "_train_epoch", original)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = fit(SpikingMLP(64, [64], 10), digits, config(epochs=4), str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    # same weights, optimizer, schedule and shuffling: the resumed run matches the uninterrupted one
    assert resumed.history[-1].test_acc == pytest.approx(straight.history[-1].test_acc, abs=1e-6)


def test_a_diverging_run_is_recorded_and_keeps_its_history(digits, tmp_path):
    torch.manual_seed(2)
    model = SpikingMLP(64, [64], 10)
    with torch.no_grad():
        model.readout.weight.fill_(float("inf"))
    result = fit(model, digits, config(epochs=3), str(tmp_path))
    assert result.status == "DIVERGED" and result.diverged_epoch == 1 and result.history == []
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_bad_config():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="reg_type"):
        TrainConfig(reg_type="l3")


def test_a_huge_learning_rate_is_recorded_as_diverged(digits):
    torch.manual_seed(3)
    result = fit(SpikingMLP(64, [32], 10), digits, config(epochs=2, batch_size=256, T=3, lr=1e30))
    assert result.status == "DIVERGED" and result.diverged_epoch == 1
