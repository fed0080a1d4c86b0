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
    straight_result = fit(straight, digits, cfg, str(tmp_path / "straight"), forward=forward, loss=loss)
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
    strip = lambda h: [{k: v for k, v in vars(m).items() if k != "time_sec"} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight_result.history)  # epoch 2 drew what it drew before
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


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


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


class HandCount:
    """Counts by hand what fit's TensorBoard figures should show for each neuron layer of a
    tutorial-5 network trained with the penalty at ``lyap_fraction=1`` (every batch of B samples
    runs as 2B rows, the samples first): spikes of the samples' rows per neuron, sample-steps, and
    per training batch the sum over time steps of |dL/d input current|^2 over those rows."""

    def __init__(self, model):
        self.spikes, self.steps, self.grad_sq = {}, {}, {}
        self.handles = [model.register_forward_pre_hook(self._new_batch)]
        for name in ("lif1", "lif2"):
            self.handles.append(getattr(model, name).register_forward_hook(self._counter(name)))

    def _new_batch(self, model, args):
        if model.training:  # evaluation is not training
            for name in ("lif1", "lif2"):
                self.grad_sq.setdefault(name, []).append(0.0)

    def _counter(self, name):
        def count(module, inputs, output):
            if not module.training:
                return
            samples = output[0].shape[0] // 2  # the twin rows follow the samples
            self.spikes.setdefault(name, []).append(output[0][:samples].detach().sum(0))
            self.steps.setdefault(name, []).append(samples)

            def add(grad):
                self.grad_sq[name][-1] += float(grad[:samples].pow(2).sum())
            inputs[0].register_hook(add)
        return count

    def epoch(self, name, batches, steps_per_batch, which):
        """(per-neuron rates, mean gradient norm, the 20 bins' neuron counts) of the ``which``-th
        epoch of ``batches`` batches."""
        calls = slice(which * batches * steps_per_batch, (which + 1) * batches * steps_per_batch)
        spikes, steps = torch.stack(self.spikes[name][calls]).sum(0).long(), sum(self.steps[name][calls])
        norms = [math.sqrt(s) for s in self.grad_sq[name][which * batches: (which + 1) * batches]]
        # a neuron with k spikes in n sample-steps is in bin floor(20 k / n) of [0, 1], exactly
        exact = (20 * spikes // steps).clamp(max=19)
        bins = torch.bincount(exact, minlength=20).tolist()
        return (spikes.double() / steps).numpy(), sum(norms) / len(norms), bins


def test_fits_tensorboard_figures_of_an_snntorch_model_are_a_hand_count(tmp_path):
    """Per layer and epoch: firing_rate = spikes / (steps x samples), dead_fraction = neurons
    below the profiler's 0.01 dead rate, the rate histogram's 20 bins, grad_norm = the mean over
    batches of sqrt(sum over steps of |dL/dI_t|^2) — counted by hooks of the test's own, on the
    samples' rows of the penalty's extended batch, training batches only."""
    pytest.importorskip("tensorboard")
    data = load_dataset("digits").subset(train=192, test=64, seed=1)
    model = snntorch_tutorial5(num_inputs=64, num_hidden=24, num_outputs=10, num_steps=5, weight_gain=2.0)
    count = HandCount(model)
    fit(model, data, config(epochs=2, lyapunov=True, lyap_fraction=1.0), str(tmp_path), forward=forward, loss=loss)
    for handle in count.handles:
        handle.remove()
    events = _events(tmp_path / "tensorboard")
    for name in ("lif1", "lif2"):
        for which in (0, 1):  # 192 samples in batches of 64: 3 batches of 5 steps per epoch
            rates, grad_norm, bins = count.epoch(name, batches=3, steps_per_batch=5, which=which)
            at = lambda tag: [e.value for e in events.Scalars(f"{tag}/{name}")][which]  # noqa: E731
            assert at("firing_rate") == pytest.approx(float(rates.mean()), rel=1e-5)
            assert at("dead_fraction") == pytest.approx(float((rates < 0.01).mean()), rel=1e-6)
            assert at("grad_norm") == pytest.approx(grad_norm, rel=1e-4)
            histogram = events.Histograms(f"rate_histogram/{name}")[which]
            assert histogram.step == which + 1
            assert list(histogram.histogram_value.bucket) == bins

    assert 0 < count.epoch("lif1", 3, 5, 0)[0].mean() < 1  # the layers fire, but not always


def test_a_rate_on_a_bin_edge_is_counted_in_the_bin_it_opens(tmp_path):
    pytest.importorskip("tensorboard")
    from torch import nn

    import stablespike as ss

    class SevenInTwenty(nn.Module):  # a registered neuron: samples 0-6 of every 20 fire, the rest not
        def forward(self, x):
            fires = (torch.arange(len(x)) % 20 < 7).float()[:, None]
            return x - x.detach() + fires

    data = load_dataset("digits").subset(train=40, test=20, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), SevenInTwenty(), nn.Linear(5, 10))
    ss.register_neuron(SevenInTwenty)
    try:
        fit(model, data, config(epochs=1, batch_size=40), str(tmp_path), forward=lambda m, x: m(x))
    finally:
        ss.neurons.DEFAULT_REGISTRY.unregister(SevenInTwenty)
    events = _events(tmp_path / "tensorboard")
    assert [e.value for e in events.Scalars("firing_rate/2")] == [pytest.approx(0.35)]  # 14 of 40
    assert list(events.Histograms("rate_histogram/2")[0].histogram_value.bucket)[7] == 5  # [0.35, 0.40)


def test_diagnostics_false_leaves_the_per_layer_figures_out(tmp_path):
    pytest.importorskip("tensorboard")
    data = load_dataset("digits").subset(train=64, test=32, seed=0)
    model = net()
    fit(model, data, config(epochs=1, diagnostics=False), str(tmp_path), forward=forward, loss=loss)
    tags = _events(tmp_path / "tensorboard").Tags()
    assert "test_acc" in tags["scalars"] and tags["histograms"] == []
    assert not any(tag.startswith(("firing_rate/", "grad_norm/")) for tag in tags["scalars"])


def test_an_output_dimension_as_long_as_the_extended_batch_is_not_taken_for_the_samples(digits):
    """With the penalty at lyap_fraction 0.25, the last batch of 8 samples runs as 10 rows: the
    spike record (T=10, 10, classes=10) has three dimensions of that size. fit keeps the samples'
    dimension the first batch (16 + 4 rows) showed: the loss sees the samples' own record."""
    data = load_dataset("digits").subset(train=24, test=16, seed=0)
    model = snntorch_tutorial5(num_inputs=64, num_hidden=16, num_outputs=10, num_steps=10, weight_gain=2.0)
    seen = []

    def remembering_forward(m, x):
        seen.append(x.flatten(1))
        return m(x.flatten(1))

    def checking_loss(outputs, y):
        spikes, mem = outputs
        with torch.no_grad():  # the samples alone, before this step's update
            _, alone = model(seen[-1][:len(y)])
        assert mem.shape == (10, len(y), 10) and torch.allclose(mem, alone, atol=1e-5)
        return loss(outputs, y)

    result = fit(model, data, config(epochs=1, batch_size=16, lyapunov=True, lyap_fraction=0.25),
                 forward=remembering_forward, loss=checking_loss)
    assert result.status == "OK" and result.history[0].lyapunov is not None


def test_an_extended_batch_no_batch_can_tell_apart_is_named():
    # one batch of 8 samples + 2 twin rows = 10 = T = classes: nothing tells which is the samples' axis
    data = load_dataset("digits").subset(train=8, test=8, seed=0)
    model = snntorch_tutorial5(num_inputs=64, num_hidden=16, num_outputs=10, num_steps=10)
    with pytest.raises(ValueError, match=r"forward: output 0 has shape \(10, 10, 10\), with several dimensions "
                                         r"of size 10.*config.batch_size or config.lyap_fraction"):
        fit(model, data, config(epochs=1, batch_size=8, lyapunov=True, lyap_fraction=0.25), forward=forward, loss=loss)


def test_fit_trains_an_init_hidden_snntorch_sequential_with_the_penalty(digits):
    """snnTorch tutorial 6/7's form: ``nn.Sequential`` of ``snn.Leaky(init_hidden=True)``, one call
    per step after ``utils.reset(net)``, the output layer with ``output=True``."""
    import snntorch as snn
    from snntorch import utils
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), snn.Leaky(beta=0.9, init_hidden=True),
                          nn.Linear(64, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))

    def forward_steps(net, x, num_steps=6):  # x (B, 1, 8, 8) -> (spk_rec, mem_rec), each (T, B, 10)
        spk_rec, mem_rec = [], []
        utils.reset(net)
        for _ in range(num_steps):
            spk_out, mem_out = net(x)
            spk_rec.append(spk_out)
            mem_rec.append(mem_out)
        return torch.stack(spk_rec), torch.stack(mem_rec)

    result = fit(model, digits, config(lyapunov=True), forward=forward_steps, loss=loss)
    assert result.status == "OK" and all(math.isfinite(m.lyapunov) for m in result.history)
    assert result.history[-1].test_acc > 0.3  # chance is 0.1
    with torch.no_grad():  # the class with the most output spikes, counted by hand
        spikes, _ = forward_steps(model.eval(), digits.x_test)
    assert result.history[-1].test_acc == pytest.approx(float((spikes.sum(0).argmax(1) == digits.y_test).float().mean()))


class _Spy:
    """A callback that notes the protocol's calls and the model's forwards between them."""

    def __init__(self, stop_at=None):
        self.events, self.stop_at, self.forwards = [], stop_at, 0

    def on_train_begin(self, model):
        model.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))
        self.events.append("begin")

    def on_batch_end(self, step, model, loss=None, lyapunov=None):
        self.events.append("batch")
        if self.stop_at is not None and self.events.count("batch") == self.stop_at:
            raise KeyboardInterrupt

    def on_eval_begin(self):
        self.events.append("eval_begin")
        self.forwards = 0

    def on_eval_end(self):
        self.events.append(f"eval_end:{self.forwards}")

    def on_train_end(self):
        self.events.append("end")

    def on_exception(self, err):
        self.events.append(type(err).__name__)


def test_callbacks_hear_of_evaluation_and_of_an_interrupt(digits):
    """Evaluation is announced (a DiagnosticsCallback counted the test set's spikes into its next
    row), and an interrupt too: a DiagnosticsCallback's hooks stayed on the model and recorded
    every later forward."""
    from stablespike import DiagnosticsCallback
    spy, model = _Spy(), net()
    fit(model, digits, config(epochs=2), forward=forward, loss=loss, callbacks=[spy])
    evals = [e for e in spy.events if e.startswith("eval_end")]
    assert spy.events.count("eval_begin") == 2 and all(int(e.split(":")[1]) > 0 for e in evals)
    assert spy.events[-1] == "end" and spy.events.index("eval_begin") > spy.events.index("batch")
    diag, stop, model = DiagnosticsCallback(every=2), _Spy(stop_at=3), net()
    with pytest.raises(KeyboardInterrupt):
        fit(model, digits, config(epochs=2), forward=forward, loss=loss, callbacks=[diag, stop])
    assert stop.events[-1] == "KeyboardInterrupt"
    left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules() if m is not model)
    assert left == 0  # the spy's own hook sits on the model itself
