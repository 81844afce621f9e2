"""Losses against numbers derived by hand from the papers' formulas, on plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from privdpo.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogps,
    preference_loss,
    sft_loss,
)

BETA = 0.1

# Two pairs (B = 2): (chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens).
ROWS = [
    (-10.0, -14.0, -11.0, -12.0, 4, 5),
    (-20.0, -18.0, -19.0, -17.5, 8, 6),
]


def log_sigmoid(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def make_logps(rows=ROWS, with_ref: bool = True, requires_grad: bool = False) -> PairLogps:
    cols = list(zip(*rows, strict=True))

    def t(i, grad=False):
        return torch.tensor(cols[i], dtype=torch.float64, requires_grad=grad)

    return PairLogps(
        chosen=t(0, requires_grad),
        rejected=t(1, requires_grad),
        chosen_tokens=torch.tensor(cols[4]),  # int tokens, as the collator gives them
        rejected_tokens=torch.tensor(cols[5]),
        ref_chosen=t(2) if with_ref else None,
        ref_rejected=t(3) if with_ref else None,
    )


def h(row) -> float:
    c, r, rc, rr, _, _ = row
    return (c - rc) - (r - rr)


def h_avg(row) -> float:
    c, r, rc, rr, nc, nr = row
    return (c - rc) / nc - (r - rr) / nr


def check(name: str, expected: list[float], params: LossParams, rows=ROWS) -> None:
    out = preference_loss(name, make_logps(rows), params)
    assert out.losses.shape == (len(rows),)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_values_of_h():
    # Row 1: (-10 - -11) - (-14 - -12) = 1 + 2 = 3; row 2: (-20 - -19) - (-18 - -17.5) = -0.5.
    assert [h(r) for r in ROWS] == [3.0, -0.5]
    # Row 1: 1/4 + 2/5 = 0.65; row 2: -1/8 + 0.5/6.
    assert [h_avg(r) for r in ROWS] == pytest.approx([0.65, -0.125 + 0.5 / 6])


def test_sigmoid():
    # Row 1: -log sigmoid(0.3) = log(1 + e^-0.3) = 0.554355...
    expected = [-log_sigmoid(BETA * h(r)) for r in ROWS]
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-0.3)))
    check("sigmoid", expected, LossParams(beta=BETA))


def test_sigmoid_rewards():
    out = preference_loss("sigmoid", make_logps(), LossParams(beta=BETA))
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * 1.0, 0.1 * -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([0.1 * -2.0, 0.1 * -0.5])
    assert not out.chosen_rewards.requires_grad


def test_cdpo():
    eps = 0.2
    expected = [
        -(1 - eps) * log_sigmoid(BETA * h(r)) - eps * log_sigmoid(-BETA * h(r)) for r in ROWS
    ]
    check("cdpo", expected, LossParams(beta=BETA, label_smoothing=eps))


def test_robust():
    eps = 0.2
    expected = [
        ((1 - eps) * -log_sigmoid(BETA * h(r)) - eps * -log_sigmoid(-BETA * h(r))) / (1 - 2 * eps)
        for r in ROWS
    ]
    check("robust", expected, LossParams(beta=BETA, label_smoothing=eps))


def test_ipo():
    # Row 1: (0.65 - 1/(2*0.1))^2 = (0.65 - 5)^2 = 18.9225.
    expected = [(h_avg(r) - 1 / (2 * BETA)) ** 2 for r in ROWS]
    assert expected[0] == pytest.approx(18.9225)
    check("ipo", expected, LossParams(beta=BETA))


def test_hinge():
    # Row 1: max(0, 1 - 0.3) = 0.7; row 2: max(0, 1 + 0.05) = 1.05.
    check("hinge", [0.7, 1.05], LossParams(beta=BETA))


def test_dpo_norm():
    expected = [-log_sigmoid(BETA * h_avg(r)) for r in ROWS]
    check("dpo_norm", expected, LossParams(beta=BETA))


def test_rpo_uses_per_pair_token_mean_nll():
    alpha = 0.5
    # NLL per pair: row 1: 10/4 = 2.5; row 2: 20/8 = 2.5.
    expected = [-log_sigmoid(BETA * h(r)) + alpha * (-r[0] / r[4]) for r in ROWS]
    check("rpo", expected, LossParams(beta=BETA, rpo_alpha=alpha))


def test_rpo_pair_loss_depends_on_that_pair_only():
    params = LossParams(beta=BETA)
    both = preference_loss("rpo", make_logps(), params).losses
    alone = preference_loss("rpo", make_logps(ROWS[:1]), params).losses
    assert both[0].item() == pytest.approx(alone[0].item(), abs=1e-12)


def test_simpo():
    beta, gamma = 2.0, 0.5
    expected, rewards = [], []
    for c, r, _, _, nc, nr in ROWS:
        r_c, r_r = beta * c / nc, beta * r / nr
        expected.append(-log_sigmoid(r_c - r_r - gamma))
        rewards.append((r_c, r_r))
    # Row 1: r_c = 2 * -10/4 = -5, r_r = 2 * -14/5 = -5.6; -log sigmoid(0.6 - 0.5).
    assert expected[0] == pytest.approx(-log_sigmoid(0.1))
    params = LossParams(beta=beta, simpo_gamma=gamma)
    check("simpo", expected, params)
    out = preference_loss("simpo", make_logps(with_ref=False), params)
    assert out.chosen_rewards.tolist() == pytest.approx([rc for rc, _ in rewards])
    assert out.rejected_rewards.tolist() == pytest.approx([rr for _, rr in rewards])


def test_orpo():
    lam = 0.25
    expected, rewards = [], []
    for c, r, _, _, nc, nr in ROWS:
        a, b = c / nc, r / nr  # average log-probs, < 0
        log_odds_c = math.log(math.exp(a) / (1 - math.exp(a)))
        log_odds_r = math.log(math.exp(b) / (1 - math.exp(b)))
        l_or = -log_sigmoid(log_odds_c - log_odds_r)
        expected.append(-a + lam * l_or)
        rewards.append((BETA * a, BETA * b))
    params = LossParams(beta=BETA, orpo_lambda=lam)
    check("orpo", expected, params)
    out = preference_loss("orpo", make_logps(with_ref=False), params)
    assert out.chosen_rewards.tolist() == pytest.approx([rc for rc, _ in rewards])
    assert out.rejected_rewards.tolist() == pytest.approx([rr for _, rr in rewards])


def test_orpo_is_accurate_for_average_logps_near_zero():
    # Chosen a = -1e-8 per token: in float32 exp(a) rounds to 1, so log1p(-exp(a)) is -inf.
    # By hand: log(1 - exp(a)) ~ log(-a) = log(1e-8); b = -5.
    a, b, lam = -1e-8, -5.0, 0.1
    log_odds_c = a - math.log(-math.expm1(a))
    log_odds_r = b - math.log(-math.expm1(b))
    expected = -a - lam * log_sigmoid(log_odds_c - log_odds_r)
    chosen = torch.tensor([4 * a], dtype=torch.float32, requires_grad=True)
    logps = PairLogps(
        chosen=chosen,
        rejected=torch.tensor([4 * b], requires_grad=True),
        chosen_tokens=torch.tensor([4]),
        rejected_tokens=torch.tensor([4]),
    )
    out = preference_loss("orpo", logps, LossParams(orpo_lambda=lam))
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_orpo_log_odds_match_on_both_sides_of_the_branch_switch():
    # Average log-probs either side of -log 2, where `_log1mexp` switches formula.
    rows = [(-4 * 0.69, -4 * 0.70, 0.0, 0.0, 4, 4), (-4 * 0.70, -4 * 0.69, 0.0, 0.0, 4, 4)]
    lam = 1.0
    expected = []
    for c, r, _, _, nc, nr in rows:
        a, b = c / nc, r / nr
        l_or = -log_sigmoid(
            math.log(math.exp(a) / (1 - math.exp(a))) - math.log(math.exp(b) / (1 - math.exp(b)))
        )
        expected.append(-a + lam * l_or)
    check("orpo", expected, LossParams(orpo_lambda=lam), rows=rows)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradients_flow_to_policy_logps_only(name):
    logps = make_logps(requires_grad=True)
    assert not logps.ref_chosen.requires_grad
    out = preference_loss(name, logps, LossParams(beta=BETA, label_smoothing=0.1))
    out.losses.mean().backward()
    assert logps.chosen.grad is not None and torch.isfinite(logps.chosen.grad).all()
    assert logps.rejected.grad is not None and torch.isfinite(logps.rejected.grad).all()
    assert logps.chosen.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_label_smoothing_is_sigmoid(name):
    params = LossParams(beta=BETA, label_smoothing=0.0)
    expected = preference_loss("sigmoid", make_logps(), params).losses
    got = preference_loss(name, make_logps(), params).losses
    torch.testing.assert_close(got, expected)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown preference loss 'nope'") as info:
        preference_loss("nope", make_logps(), LossParams())
    for name in PREFERENCE_LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES) - REFERENCE_FREE))
def test_reference_based_loss_without_ref_raises(name):
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(name, make_logps(with_ref=False), LossParams())


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_loss_ignores_ref(name):
    params = LossParams()
    without = preference_loss(name, make_logps(with_ref=False), params).losses
    with_ref = preference_loss(name, make_logps(), params).losses
    torch.testing.assert_close(without, with_ref)


def test_limits():
    # h = 0 for both rows: chosen and rejected moved by the same amount from the reference.
    zero_h = [(-10.0, -12.0, -11.0, -13.0, 4, 5), (-3.0, -3.0, -3.0, -3.0, 2, 2)]
    out = preference_loss("sigmoid", make_logps(zero_h), LossParams(beta=BETA))
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)

    # IPO at h_avg = 1/(2 beta) = 5: chosen log-ratio 5 per token over 2 tokens, rejected 0.
    at_target = [(-1.0, -7.0, -11.0, -7.0, 2, 3)]
    out = preference_loss("ipo", make_logps(at_target), LossParams(beta=BETA))
    assert out.losses.tolist() == pytest.approx([0.0], abs=1e-12)

    # Hinge at beta * h = 1 and beyond: h = 10 and h = 30 with beta = 0.1.
    past_margin = [(0.0, -10.0, 0.0, 0.0, 1, 1), (-1.0, -40.0, -1.0, -10.0, 3, 3)]
    out = preference_loss("hinge", make_logps(past_margin), LossParams(beta=BETA))
    assert out.losses.tolist() == [0.0, 0.0]


def test_registry_has_exactly_the_nine_losses():
    assert set(PREFERENCE_LOSSES) == {
        "sigmoid",
        "cdpo",
        "robust",
        "ipo",
        "hinge",
        "dpo_norm",
        "rpo",
        "simpo",
        "orpo",
    }
    assert REFERENCE_FREE == {"simpo", "orpo"}


def test_loss_params_rejects_bad_values_all_at_once():
    with pytest.raises(ValueError) as info:
        LossParams(beta=0.0, label_smoothing=0.5)
    assert "beta" in str(info.value) and "label_smoothing" in str(info.value)


def test_sft_loss():
    # A micro-batch's 3 label tokens; the logical batch has 6 label tokens (another
    # micro-batch holds the other 3), so the divisor is 6: (2 + 3 + 0.5) / 6 = 5.5 / 6.
    token_logps = torch.tensor([-2.0, -3.0, -0.5])
    assert sft_loss(token_logps, num_tokens=6).item() == pytest.approx(5.5 / 6)
