"""The ten penalty kinds of seed 002, checked against their formulas written out by hand."""
import math

import pytest
import torch

from stablespike import PENALTY_KINDS, LyapunovRegularizer, compute_lyap_reg_loss

TARGET, THRESHOLD = -0.1, 2.0


def relu(v):
    return max(v, 0.0)


# Each formula from seed 002's docstring/comments, in plain Python floats.
FORMULAS = {
    "squared": lambda l: (l - TARGET) ** 2,
    "hinge": lambda l: relu(l) ** 2,
    "asymmetric": lambda l: relu(l) ** 2 + 0.1 * relu(-l - 1.0) ** 2,
    "extreme": lambda l: relu(l - THRESHOLD) ** 2,
    "adaptive_linear": lambda l: relu(l - THRESHOLD) ** 3,
    "adaptive_exp": lambda l: (math.exp(relu(l - THRESHOLD)) - 1.0) * relu(l - THRESHOLD),
    "adaptive_sigmoid": lambda l: (l - TARGET) ** 2 / (1.0 + math.exp(-(l - THRESHOLD) / 0.5)),
    "mult_linear": lambda l: relu(l) ** 2,
    "mult_squared": lambda l: relu(l) ** 3,
    "mult_log": lambda l: math.log1p(relu(l)) * relu(l),
    "flossing": lambda l: l ** 2,
}
POINTS = [-2.5, -0.6, 0.0, 0.5, 1.0, 2.4, 3.0]


def test_the_ten_seed_kinds_and_flossing():
    assert sorted(PENALTY_KINDS) == sorted(FORMULAS) and len(PENALTY_KINDS) == 11


def test_flossing_sums_the_squared_spectrum():
    spectrum = torch.tensor([0.3, -0.1, -0.5], requires_grad=True)
    loss = compute_lyap_reg_loss(spectrum, "flossing", 0.0)
    assert loss.item() == pytest.approx(0.09 + 0.01 + 0.25)
    loss.backward()
    assert torch.allclose(spectrum.grad, 2 * spectrum.detach())


@pytest.mark.parametrize("kind", sorted(FORMULAS))
def test_penalty_matches_its_formula(kind):
    for lam in POINTS:
        got = compute_lyap_reg_loss(torch.tensor(lam, dtype=torch.float64), kind, TARGET, THRESHOLD)
        assert float(got) == pytest.approx(FORMULAS[kind](lam), rel=1e-9, abs=1e-12), (kind, lam)


def test_seed_comment_values_of_the_multiplier_kinds():
    # seed 002: mult_linear 1.0 -> 1.0, 2.0 -> 4.0; mult_squared 0.5 -> 0.125; mult_log 2.0 -> 2.20
    assert float(compute_lyap_reg_loss(torch.tensor(2.0), "mult_linear", 0.0)) == pytest.approx(4.0)
    assert float(compute_lyap_reg_loss(torch.tensor(0.5), "mult_squared", 0.0)) == pytest.approx(0.125)
    assert float(compute_lyap_reg_loss(torch.tensor(2.0), "mult_log", 0.0)) == pytest.approx(2.197, abs=1e-3)


@pytest.mark.parametrize("kind", sorted(FORMULAS))
def test_gradient_pushes_lambda_the_right_way(kind):
    # Where a penalty is active, descending it must move lambda toward the stable side / target.
    for lam in POINTS:
        x = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        compute_lyap_reg_loss(x, kind, TARGET, THRESHOLD).backward()
        h = 1e-6
        numeric = (FORMULAS[kind](lam + h) - FORMULAS[kind](lam - h)) / (2 * h)
        assert float(x.grad) == pytest.approx(numeric, rel=1e-4, abs=1e-6), (kind, lam)
    chaotic = torch.tensor(3.0, requires_grad=True)
    compute_lyap_reg_loss(chaotic, kind, TARGET, THRESHOLD).backward()
    assert chaotic.grad > 0  # every kind penalizes strong chaos: gradient descent lowers lambda


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="squared, hinge, asymmetric"):
        compute_lyap_reg_loss(torch.tensor(0.0), "quadratic", 0.0)
    with pytest.raises(ValueError, match="^kind: expected one of .*mult_log"):
        LyapunovRegularizer(kind="l2")


def test_regularizer_warmup_is_linear_over_epochs():
    reg = LyapunovRegularizer(weight=0.3, kind="squared", target=-0.1, warmup_epochs=3)
    assert [reg.weight_at(e) for e in (1, 2, 3, 4, 10)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    lam = torch.tensor(0.4)
    assert float(reg(lam, epoch=1)) == pytest.approx(0.1 * 0.25)
    assert float(LyapunovRegularizer(weight=0.5)(lam)) == pytest.approx(0.5 * 0.25)
    with pytest.raises(ValueError, match="warmup_epochs"):
        LyapunovRegularizer(warmup_epochs=-1)
    with pytest.raises(ValueError, match="weight"):
        LyapunovRegularizer(weight=-1.0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(target=float("nan")), "target"), (dict(threshold=float("inf")), "threshold"),
    (dict(weight=float("nan")), "weight"), (dict(weight=float("inf")), "weight"),
    (dict(warmup_epochs=1.5), "warmup_epochs"), (dict(warmup_epochs=True), "warmup_epochs"),
])
def test_regularizer_refuses_values_that_would_train_silently_wrong(kwargs, name):
    # a NaN target makes every penalty NaN: the run would be recorded as diverged
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        LyapunovRegularizer(**kwargs)


def test_penalty_refuses_a_non_finite_target():
    with pytest.raises(ValueError, match="lambda_target: expected a finite number, got nan"):
        compute_lyap_reg_loss(torch.tensor(0.5), "squared", float("nan"))


def test_the_result_of_an_estimate_is_penalized_through_its_exponent():
    """reg(res) with the result itself, not res.exponent: the penalty went through float(res)
    and had no gradient (the training step silently ignored it)."""
    from stablespike import SpikingMLP, finite_difference_lyapunov
    torch.manual_seed(0)
    model = SpikingMLP(6, [12, 12], 3, threshold=0.3)
    res = finite_difference_lyapunov(model, torch.rand(4, 10, 6), batch_dim=0, eps=0.1,
                                     generator=torch.Generator().manual_seed(1))
    reg = LyapunovRegularizer(weight=0.5, kind="squared", target=-0.1)
    want = torch.autograd.grad(reg(res.exponent), model.linears[0].weight, retain_graph=True)[0]
    got = torch.autograd.grad(reg(res), model.linears[0].weight)[0]
    assert want.abs().sum() > 0
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="lyap_est: expected a tensor, a number or a result"):
        reg("0.3")
