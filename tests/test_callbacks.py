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
