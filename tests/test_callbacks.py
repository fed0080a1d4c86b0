"""The diagnostics callback: logs every n steps, reports on its own window, detaches at the end."""
import pytest
import torch

from stablespike import DiagnosticsCallback, SpikingMLP


def test_callback_logs_every_n_steps_and_cleans_up():
    torch.manual_seed(0)
    model = SpikingMLP(10, [16, 16], 3, threshold=1e6)  # dead by construction
    rows = []
    cb = DiagnosticsCallback(every=2, sink=rows.append)
    cb.on_train_begin(model)
    for step in range(1, 6):
        logits, lam, _ = model(torch.rand(4, 5, 10), compute_lyapunov=True)
        loss = logits.sum()
        loss.backward()
        cb.on_batch_end(step, model, loss, lam)
    cb.on_train_end()
    assert [r["step"] for r in rows] == [2, 4] and cb.history == rows
    assert rows[0]["lyapunov"] == pytest.approx(-0.1054, abs=1e-3)  # ln 0.9 below threshold
    assert "CRITICAL silent_layer @ lifs.0" in rows[0]["findings"]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(ValueError, match="every"):
        DiagnosticsCallback(every=0)


def test_tensorboard_shows_per_layer_rates_and_gradients_of_a_users_loop(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    import stablespike as ss

    class AlwaysOn(nn.Module):  # a neuron type of the user's, registered: fires at every step
        def forward(self, x):
            return x - x.detach() + 1.0

    class NeverOn(nn.Module):  # ... and one that never fires
        def forward(self, x):
            return x * 0.0

    for kind in (AlwaysOn, NeverOn):
        ss.register_neuron(kind)
    try:
        model = nn.Sequential(nn.Linear(4, 3), AlwaysOn(), nn.Linear(3, 2), NeverOn())
        cb = ss.DiagnosticsCallback(every=2, sink=ss.TensorBoardSink(str(tmp_path)))
        cb.on_train_begin(model)
        for step in range(4):  # the user's own loop
            loss = model(torch.rand(5, 4)).sum()
            loss.backward()
            cb.on_batch_end(step, model, loss)
        cb.on_train_end()
        cb.sink.close()
    finally:
        for kind in (AlwaysOn, NeverOn):
            ss.neurons.DEFAULT_REGISTRY.unregister(kind)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})  # 0: keep every step
    events.Reload()
    rate = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert rate["firing_rate/1"] == [(0, 1.0), (2, 1.0)]  # hand count: always on, never on
    assert rate["firing_rate/3"] == [(0, 0.0), (2, 0.0)]
    assert "grad_norm/1" in rate and "diagnostics/health_score" in rate and "diagnostics/loss" in rate
    assert rate["dead_fraction/1"] == [(0, 0.0), (2, 0.0)] and rate["dead_fraction/3"] == [(0, 1.0), (2, 1.0)]
    hist = {e.step: e.histogram_value for e in events.Histograms("rate_histogram/1")}
    assert sorted(hist) == [0, 2]
    assert hist[0].num == 3 and list(hist[0].bucket)[-1] == 3  # three neurons, all at rate 1
    silent = events.Histograms("rate_histogram/3")[0].histogram_value
    assert silent.num == 2 and list(silent.bucket)[0] == 2
