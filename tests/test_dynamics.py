"""The one time loop: outputs, state handling, twin layouts, and errors."""
import pytest
import torch

from stablespike.dynamics import (StateSpec, TwinLayout, full_twins, select_layers, shared_dropout,
                                  state_spec_of, unroll)


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


def test_twin_rows_follow_their_partner_rows():
    x = torch.randn(5, 4, 3)
    twins = TwinLayout(4, torch.tensor([1, 3]))
    offset = torch.zeros(6, 3)
    offset[4:] = 1.0  # twins start one unit above their partners
    seen = []
    unroll(Accumulator(), x, (offset,), twins=twins, on_step=lambda t, out, s: seen.append(out))
    for out in seen:  # the input reaches twin rows as their partner's input
        assert torch.allclose(twins.twin(out) - twins.partner(out), torch.ones(2, 3))


def test_twin_layout_views():
    h = torch.arange(6.0).view(6, 1)
    tw = TwinLayout(4, torch.tensor([0, 2]))
    assert tw.twins == 2
    assert tw.nominal(h).flatten().tolist() == [0, 1, 2, 3]
    assert tw.twin(h).flatten().tolist() == [4, 5]
    assert tw.partner(h).flatten().tolist() == [0, 2]
    assert tw.expand(h[:4]).flatten().tolist() == [0, 1, 2, 3, 0, 2]
    assert full_twins(3).partner(torch.arange(6.0)).tolist() == [0, 1, 2]


def test_shared_dropout_reuses_the_nominal_mask():
    torch.manual_seed(0)
    tw = TwinLayout(3, torch.tensor([0, 1, 2]))
    h = tw.expand(torch.ones(3, 50))
    out = shared_dropout(h, 0.5, True, tw)
    assert torch.equal(tw.twin(out), tw.partner(out))
    assert 0 < (out == 0).float().mean() < 1
    assert torch.equal(shared_dropout(h, 0.5, False, tw), h)


def test_state_spec_default_and_layer_selection():
    spec = state_spec_of(Accumulator(), (torch.zeros(1, 3),))
    assert spec == (StateSpec(0, "continuous"),)
    spec = (StateSpec(0, "membrane"), StateSpec(1, "membrane"), StateSpec(0, "spike"))
    assert select_layers(spec, None) == (0, 1)
    assert select_layers(spec, [-1]) == (1,)
    with pytest.raises(ValueError, match="lyap_layers"):
        select_layers(spec, [2])


def test_unroll_rejects_bad_input_and_state():
    with pytest.raises(ValueError, match="2-D"):
        unroll(Accumulator(), torch.zeros(3))
    with pytest.raises(ValueError, match="state"):
        unroll(Accumulator(), torch.zeros(2, 4, 3), (torch.zeros(5, 3),))
    with pytest.raises(ValueError, match="twins"):
        unroll(Accumulator(), torch.zeros(2, 4, 3), twins=full_twins(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        unroll(Accumulator(), [[1.0]])
