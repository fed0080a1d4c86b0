"""The fit loop: learns digits, resumes after an interruption, records divergence."""
import math
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


def _tiny(**kw):
    return config(**{**dict(epochs=2, batch_size=256, T=3), **kw})


def test_a_lyapunov_run_killed_after_its_first_epoch_resumes_to_the_uninterrupted_run(digits, tmp_path, monkeypatch):
    """The perturbation directions and rows of the penalty's estimate are random draws: a run
    resumed from its epoch-1 checkpoint must draw what the uninterrupted run drew in epoch 2
    (before, they came from the global generator, reseeded when fit starts: 0.0836 vs 0.0947)."""
    import stablespike.train as train
    torch.manual_seed(4)
    initial = SpikingMLP(64, [16], 10).state_dict()

    def fresh():
        model = SpikingMLP(64, [16], 10)
        model.load_state_dict(initial)
        return model

    cfg = _tiny(lyapunov=True, lyap_fraction=0.5, lyap_eps=1e-2)
    straight_model = fresh()
    straight = fit(straight_model, digits, cfg, str(tmp_path / "straight"))
    original, calls = train._train_epoch, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), digits, cfg, str(tmp_path / "run"))
    monkeypatch.setattr(train, "_train_epoch", original)
    torch.manual_seed(123)  # wherever the global generator stands, the resumed run draws the same
    resumed_model = SpikingMLP(64, [16], 10)
    resumed = fit(resumed_model, digits, cfg, str(tmp_path / "run"))
    strip = lambda h: [{k: v for k, v in vars(m).items() if k != "time_sec"} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name


def test_fit_leaves_the_global_generator_where_it_was(digits):
    model = SpikingMLP(64, [8], 10)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    fit(model, digits, _tiny(epochs=1))
    assert torch.equal(torch.rand(3), expected)


class _Tutorial5(torch.nn.Module):
    """snnTorch's tutorial-5 network, classifying by its output spike counts in fit's format."""

    def __init__(self):
        super().__init__()
        from user_models import snntorch_tutorial5
        self.net = snntorch_tutorial5(num_inputs=64, num_hidden=16, num_outputs=10, num_steps=3)

    def forward(self, x):
        spikes, _ = self.net(x.flatten(1))
        return spikes.sum(0), None, None


def test_an_snntorch_model_can_be_deep_copied_after_each_training_step(digits):
    """A callback keeping a copy of the model after each step (as a best-model or EMA callback
    does): snnTorch's ``mem`` buffer must not keep the step's freed graph."""
    import copy

    class KeepCopies:
        def __init__(self):
            self.copies = []

        def on_train_begin(self, model):
            pass

        def on_batch_end(self, step, model, loss, lam):
            assert all(b.grad_fn is None for b in model.buffers())
            self.copies.append(copy.deepcopy(model))

        def on_train_end(self):
            pass

    model, keep = _Tutorial5(), KeepCopies()
    fit(model, digits, _tiny(epochs=1), callbacks=[keep])
    assert len(keep.copies) == 6  # ceil(1438 / 256) steps
    assert torch.equal(keep.copies[-1].net.fc1.weight, model.net.fc1.weight)


def test_run_files_are_not_written_through_planted_symlinks(digits, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    (run / "checkpoint.pt.tmp").symlink_to(victim)
    fit(SpikingMLP(64, [8], 10), digits, _tiny(epochs=1), str(run), resume=False)
    assert victim.read_text() == "precious"
    assert not (run / "metrics.jsonl").is_symlink() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not os.path.lexists(run / "checkpoint.pt.tmp")  # a leftover, removed


def test_a_corrupt_or_foreign_checkpoint_is_named(digits, tmp_path):
    from stablespike.runfiles import RunFileError
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFileError, match="checkpoint.pt: cannot be read"):
        fit(SpikingMLP(64, [8], 10), digits, _tiny(epochs=1), str(tmp_path))
    (tmp_path / "checkpoint.pt").unlink()
    fit(SpikingMLP(64, [8], 10), digits, _tiny(epochs=1), str(tmp_path))
    with pytest.raises(RunFileError, match="checkpoint.pt: does not fit this run"):
        fit(SpikingMLP(64, [12], 10), digits, _tiny(epochs=2), str(tmp_path))


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("lambda_target", float("nan")), ("lambda_target", float("inf")),
    ("lyap_eps", 0.0), ("lyap_fraction", 0.0), ("lyap_fraction", 1.5), ("lambda_reg", -1.0),
    ("lr", float("inf")), ("weight_decay", -1.0), ("lyap_threshold", float("nan")), ("epochs", 1.5),
    ("T", True), ("seed", -1), ("warmup_epochs", -1), ("encoder", "poisson"), ("lyapunov", "yes"),
    ("device", "bogus"), ("device", "cuda:99"),
])
def test_bad_config_fields_are_named_at_construction(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert str(err.value).startswith(f"{field}: expected ") and repr(value) in str(err.value)


def test_fit_trains_a_users_own_snntorch_model_with_the_lyapunov_penalty():
    # snnTorch tutorial 5 as written, on digits; the user's forward gives logits (spike counts)
    from stablespike.data import load_dataset
    from user_models import snntorch_tutorial5
    data = load_dataset("digits").subset(train=512, test=256, seed=0)
    net = snntorch_tutorial5(num_inputs=64, num_hidden=64, num_outputs=10, num_steps=6, weight_gain=2.0)

    def forward(model, x):  # x (B, 1, 8, 8) as the data set holds it
        spk, _ = model(x.flatten(1))
        return spk.sum(0)  # (B, 10) spike counts as logits
    cfg = TrainConfig(epochs=3, batch_size=64, lr=5e-3, lyapunov=True, lyap_eps=1e-2, lyap_fraction=0.25,
                      progress=False)
    result = fit(net, data, cfg, forward=forward)
    assert result.status == "OK" and len(result.history) == 3
    assert all(m.lyapunov is not None and math.isfinite(m.lyapunov) for m in result.history)
    assert result.history[-1].test_acc > 0.3  # chance is 0.1
    with pytest.raises(ValueError, match="forward: expected it to return logits"):
        fit(net, data, TrainConfig(epochs=1, progress=False), forward=lambda m, x: m(x.flatten(1))[0])
