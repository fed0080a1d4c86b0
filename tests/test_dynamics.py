"""The one time loop: outputs, state handling, twin rows, and errors."""
import pytest
import torch

from stablespike.dynamics import StateSpec, layer_indices, select_layers, state_spec_of, unroll
from stablespike.twins import TwinRows, choose_rows


class Accumulator:
    """s -> s + x_t, out = s: the outputs are the cumulative sums of the input."""

    def init_state(self, batch_size, device, dtype):
        return (torch.zeros(batch_size, 3, device=device, dtype=dtype),)

    def step(self, x_t, state):
        s = state[0] + x_t
        return s, (s,)


def test_unroll_is_a_time_loop():
    x = torch.randn(7, 4, 3)
    run = unroll(Accumulator(), x, record_states=True)
    assert torch.allclose(run.outputs, x.cumsum(0))
    assert torch.allclose(run.state[0], x.sum(0))
    assert len(run.states) == 7 and torch.allclose(run.states[2][0], x[:3].sum(0))


def test_twin_rows_views():
    h = torch.arange(6.0).view(6, 1)
    rows = TwinRows(4, torch.tensor([0, 2]))
    assert (rows.twins, rows.total) == (2, 6)
    assert rows.partner(h).flatten().tolist() == [0, 2]
    assert rows.difference(h).flatten().tolist() == [4, 3]
    assert rows.with_difference(h, torch.ones(2, 1)).flatten().tolist() == [0, 1, 2, 3, 1, 3]
    assert rows.extend(h[:4]).flatten().tolist() == [0, 1, 2, 3, 0, 2]
    x = torch.arange(8.0).view(2, 4)  # time-first: samples along dimension 1
    assert rows.extend(x, dim=1).tolist() == [[0, 1, 2, 3, 0, 2], [4, 5, 6, 7, 4, 6]]
    assert TwinRows(3, torch.arange(3)).partner(torch.arange(6.0)).tolist() == [0, 1, 2]


def test_sub_batch_rows_are_a_sorted_random_subset():
    rows = choose_rows(16, 0.25, "cpu", torch.Generator().manual_seed(0))
    assert rows.twins == 4 and rows.index.tolist() == sorted(set(rows.index.tolist()))
    assert choose_rows(5, 1.0, "cpu", None).index.tolist() == [0, 1, 2, 3, 4]


def test_state_spec_default_and_layer_selection():
    spec = state_spec_of(Accumulator(), (torch.zeros(1, 3),))
    assert spec == (StateSpec(0, "continuous"),)
    spec = (StateSpec(0, "membrane"), StateSpec(1, "membrane"), StateSpec(0, "spike"))
    assert select_layers(spec, None) == (0, 1)
    assert select_layers(spec, [-1]) == (1,)
    with pytest.raises(ValueError, match="lyap_layers"):
        select_layers(spec, [2])
    for bad in ([1.5], [True], ["0"]):  # not silently truncated to a layer
        with pytest.raises(ValueError, match=r"lyap_layers: expected layer indices in \[-2, 1\]"):
            select_layers(spec, bad)


def test_one_rule_picks_layers_for_steppers_and_neuron_modules():
    assert layer_indices(4, None, "layers", "neuron layer") == [0, 1, 2, 3]
    assert layer_indices(4, [-1, 0, 3], "layers", "neuron layer") == [0, 3]
    assert layer_indices(4, [torch.tensor(2)], "layers", "neuron layer") == [2]
    with pytest.raises(ValueError, match=r"layers: expected neuron layer indices in \[-4, 3\], got \[4\]"):
        layer_indices(4, [4], "layers", "neuron layer")


def test_unroll_rejects_bad_input_and_state():
    with pytest.raises(ValueError, match="2-D"):
        unroll(Accumulator(), torch.zeros(3))
    with pytest.raises(ValueError, match="state"):
        unroll(Accumulator(), torch.zeros(2, 4, 3), (torch.zeros(5, 3),))
    with pytest.raises(TypeError, match="torch.Tensor"):
        unroll(Accumulator(), [[1.0]])
