"""DP-SGD accounting: our functions against dp-accounting called directly, plus pinned values."""

import itertools
import json
import math
import time

import dp_accounting
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from privdpo.privacy import accounting
from privdpo.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise,
    default_delta,
    dpsgd_event,
    epsilon,
    max_steps_within,
)
from privdpo.privacy.ledger import PrivacyLedger

# (sampling_rate, noise_multiplier, steps, delta) -> epsilon observed with dp-accounting
# 0.6.0, PLD grid 1e-3 and the library's default RDP orders. A change of accountant
# settings (or of the library's numbers) fails here.
PINNED = {
    "pld": {
        (0.01, 1.0, 1000, 1e-5): 1.8289344124594729,
        (0.1, 2.0, 100, 1e-6): 2.675100378110542,
        (1.0, 5.0, 10, 1e-5): 2.5943897354998806,
    },
    "rdp": {
        (0.01, 1.0, 1000, 1e-5): 2.101366525420273,
        (0.1, 2.0, 100, 1e-6): 2.9141737620582155,
        (1.0, 5.0, 10, 1e-5): 2.8136532471298397,
    },
}
CASES = [(acc, case) for acc in ACCOUNTANTS for case in PINNED[acc]]


def direct_accountant(accountant):
    """The accountant as a user of dp-accounting would build it, written out here."""
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            value_discretization_interval=1e-3,
        )
    return dp_accounting.rdp.RdpAccountant(
        DEFAULT_RDP_ORDERS, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )


def direct_epsilon(accountant, q, sigma, steps, delta):
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    event = dp_accounting.SelfComposedDpEvent(step, steps)
    return direct_accountant(accountant).compose(event).get_epsilon(delta)


def test_settings_are_the_documented_ones():
    assert accounting.PLD_VALUE_DISCRETIZATION == 1e-3
    assert list(accounting.RDP_ORDERS) == list(DEFAULT_RDP_ORDERS)


@pytest.mark.parametrize("accountant,case", CASES)
def test_epsilon_matches_dp_accounting_and_pinned_value(accountant, case):
    q, sigma, steps, delta = case
    ours = epsilon(q, sigma, steps, delta, accountant=accountant)
    assert ours == pytest.approx(direct_epsilon(accountant, q, sigma, steps, delta), abs=1e-6)
    assert ours == pytest.approx(PINNED[accountant][case], rel=1e-4)


def test_pld_is_tighter_than_rdp():
    for case in PINNED["pld"]:
        assert epsilon(*case, accountant="pld") < epsilon(*case, accountant="rdp")


def test_dpsgd_event_structure():
    event = dpsgd_event(0.01, 1.5, 7)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.5)), 7
    )


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_edge_cases(accountant):
    assert epsilon(0.01, 0.0, 10, 1e-5, accountant) == math.inf
    assert epsilon(0.01, 1.0, 0, 1e-5, accountant) == 0.0
    assert epsilon(0.01, 0.0, 0, 1e-5, accountant) == 0.0
    # Grows with steps, shrinks with noise, grows with the sampling rate.
    assert epsilon(0.01, 1.0, 100, 1e-5, accountant) < epsilon(0.01, 1.0, 200, 1e-5, accountant)
    assert epsilon(0.01, 2.0, 100, 1e-5, accountant) < epsilon(0.01, 1.0, 100, 1e-5, accountant)
    assert epsilon(0.01, 1.0, 100, 1e-5, accountant) < epsilon(0.02, 1.0, 100, 1e-5, accountant)


@pytest.mark.parametrize("q,steps", [(0.01, 1000), (0.1, 100)])
def test_calibrate_noise_pld(q, steps):
    sigmas = []
    for target in (1.0, 4.0, 8.0):
        sigma = calibrate_noise(target, 1e-5, q, steps)
        eps = epsilon(q, sigma, steps, 1e-5)
        assert 0.99 * target <= eps <= target
        sigmas.append(sigma)
    assert sigmas[0] > sigmas[1] > sigmas[2]  # a larger budget needs less noise


def test_calibrate_noise_rdp():
    sigma = calibrate_noise(4.0, 1e-5, 0.01, 1000, accountant="rdp")
    assert 0.99 * 4.0 <= epsilon(0.01, sigma, 1000, 1e-5, accountant="rdp") <= 4.0
    assert sigma > calibrate_noise(4.0, 1e-5, 0.01, 1000, accountant="pld")  # RDP is looser


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_max_steps_within(accountant):
    steps = max_steps_within(3.0, 1e-5, 0.01, 1.0, accountant)
    assert steps > 0
    assert epsilon(0.01, 1.0, steps, 1e-5, accountant) <= 3.0
    assert epsilon(0.01, 1.0, steps + 1, 1e-5, accountant) > 3.0


def test_max_steps_within_when_one_step_is_too_many():
    assert max_steps_within(1.0, 1e-5, 0.5, 0.0) == 0  # no noise: no step is private
    assert max_steps_within(0.01, 1e-5, 1.0, 1.0) == 0


def test_ledger_merges_segments_and_composes():
    q1, s1, q2, s2 = 0.02, 1.1, 0.05, 1.5
    ledger = PrivacyLedger(unit="pair", delta=1e-5, accountant="pld")
    assert ledger.steps == 0 and ledger.epsilon() == 0.0
    for _ in range(5):
        ledger.record_step(q1, s1)
    for _ in range(3):
        ledger.record_step(q2, s2)
    assert ledger.segments == [[q1, s1, 5], [q2, s2, 3]]
    assert ledger.steps == 8

    composed = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q1, dp_accounting.GaussianDpEvent(s1)), 5
            ),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q2, dp_accounting.GaussianDpEvent(s2)), 3
            ),
        ]
    )
    expected = direct_accountant("pld").compose(composed).get_epsilon(1e-5)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-6)

    # Back to the first setting: a new segment, composition order kept.
    ledger.record_step(q1, s1)
    assert ledger.segments == [[q1, s1, 5], [q2, s2, 3], [q1, s1, 1]]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_ledger_round_trips_through_json(accountant):
    ledger = PrivacyLedger(unit="user", delta=1e-6, accountant=accountant)
    for _ in range(4):
        ledger.record_step(0.01, 0.9)
    ledger.record_step(0.02, 1.2)
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored == ledger
    assert restored.epsilon() == ledger.epsilon()
    # The restored ledger is independent of the original.
    restored.record_step(0.02, 1.2)
    assert ledger.segments[-1][2] == 1 and restored.segments[-1][2] == 2


def test_ledger_single_segment_equals_epsilon():
    ledger = PrivacyLedger(unit="example", delta=1e-5)
    for _ in range(50):
        ledger.record_step(0.01, 1.0)
    assert ledger.epsilon() == epsilon(0.01, 1.0, 50, 1e-5)


def test_ledger_epsilon_grows_and_is_cached():
    ledger = PrivacyLedger(unit="example", delta=1e-5)
    values = []
    for _ in range(5):
        for _ in range(20):
            ledger.record_step(0.05, 1.0)
        values.append(ledger.epsilon())
    assert all(a < b for a, b in itertools.pairwise(values))
    hits = accounting._composed_epsilon.cache_info().hits
    assert ledger.epsilon() == values[-1]
    assert accounting._composed_epsilon.cache_info().hits == hits + 1


def test_ledger_noiseless_step_is_infinite():
    ledger = PrivacyLedger(unit="example", delta=1e-5)
    ledger.record_step(0.01, 1.0)
    ledger.record_step(0.01, 0.0)
    assert ledger.epsilon() == math.inf


def test_ledger_max_more_steps():
    fresh = PrivacyLedger(unit="example", delta=1e-5)
    assert fresh.max_more_steps(0.01, 1.0, 3.0) == max_steps_within(3.0, 1e-5, 0.01, 1.0)

    ledger = PrivacyLedger(unit="example", delta=1e-5, segments=[[0.02, 1.0, 300]])
    more = ledger.max_more_steps(0.01, 1.0, 3.0)
    assert 0 < more
    within = PrivacyLedger(
        unit="example", delta=1e-5, segments=[[0.02, 1.0, 300], [0.01, 1.0, more]]
    )
    beyond = PrivacyLedger(
        unit="example", delta=1e-5, segments=[[0.02, 1.0, 300], [0.01, 1.0, more + 1]]
    )
    assert within.epsilon() <= 3.0 < beyond.epsilon()
    assert ledger.max_more_steps(0.01, 1.0, 0.5) == 0  # already over budget


@pytest.mark.parametrize("n", [1, 9, 10, 11, 100, 999, 1000, 5000, 60_000, 10**6])
def test_default_delta_below_one_over_n(n):
    delta = default_delta(n)
    assert delta <= 1 / (10 * n) < 1 / n
    assert delta > 1 / (100 * n)  # the largest such power of ten
    assert math.log10(delta) == round(math.log10(delta))


def test_default_delta_examples():
    assert default_delta(1000) == 1e-4
    assert default_delta(5000) == 1e-5
    assert default_delta(60_000) == 1e-6


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: epsilon(0.0, 1.0, 10, 1e-5), "sampling_rate"),
        (lambda: epsilon(1.5, 1.0, 10, 1e-5), "sampling_rate"),
        (lambda: epsilon(0.1, -1.0, 10, 1e-5), "noise_multiplier"),
        (lambda: epsilon(0.1, math.nan, 10, 1e-5), "noise_multiplier"),
        (lambda: epsilon(0.1, 1.0, -1, 1e-5), "steps"),
        (lambda: epsilon(0.1, 1.0, 2.5, 1e-5), "steps"),
        (lambda: epsilon(0.1, 1.0, 10, 0.0), "delta"),
        (lambda: epsilon(0.1, 1.0, 10, 1.0), "delta"),
        (lambda: epsilon(0.1, 1.0, 10, 1e-5, accountant="prv"), "accountant"),
        (lambda: dpsgd_event(0.1, -0.5, 10), "noise_multiplier"),
        (lambda: calibrate_noise(0.0, 1e-5, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(math.inf, 1e-5, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(1.0, 1e-5, 0.1, 0), "steps"),
        (lambda: calibrate_noise(1.0, 2.0, 0.1, 10), "delta"),
        (lambda: max_steps_within(-1.0, 1e-5, 0.1, 1.0), "target_epsilon"),
        (lambda: max_steps_within(1.0, 1e-5, 0.1, 1.0, accountant="gdp"), "accountant"),
        (lambda: default_delta(0), "num_units"),
        (lambda: PrivacyLedger(unit="row", delta=1e-5), "unit"),
        (lambda: PrivacyLedger(unit="pair", delta=0.0), "delta"),
        (lambda: PrivacyLedger(unit="pair", delta=1e-5, accountant="x"), "accountant"),
        (lambda: PrivacyLedger(unit="pair", delta=1e-5, segments=[[0.1, 1.0]]), "segments"),
        (lambda: PrivacyLedger(unit="pair", delta=1e-5).record_step(2.0, 1.0), "sampling_rate"),
        (lambda: PrivacyLedger.from_dict({"unit": "pair", "delta": 1e-5}), "accountant"),
    ],
)
def test_invalid_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_unknown_accountant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\('pld', 'rdp'\)"):
        epsilon(0.1, 1.0, 10, 1e-5, accountant="prv")


# ---------------------------------------------------------------------------
# Ledger with user-level ELS accounting (els_bound)
# ---------------------------------------------------------------------------


@pytest.fixture
def empty_privacy_cache(tmp_path, monkeypatch):
    """ELS results are cached on disk: keep this test's apart from ~/.cache."""
    monkeypatch.setenv("PRIVDPO_CACHE_DIR", str(tmp_path / "cache"))


def mog_step(q, sigma, k):
    """One ELS step from dp-accounting directly: Binomial(k, q) clipped units of norm 1."""
    return dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        standard_deviation=sigma,
        sensitivities=list(range(k + 1)),
        sampling_probs=[math.comb(k, j) * q**j * (1 - q) ** (k - j) for j in range(k + 1)],
    )


def test_els_ledger_matches_direct_mixture_of_gaussians(empty_privacy_cache):
    from privdpo.privacy.els_accounting import els_epsilon

    q1, s1, q2, s2, k = 0.05, 1.5, 0.1, 2.0, 2
    ledger = PrivacyLedger(unit="user", delta=1e-5, els_bound=k)
    assert ledger.epsilon() == 0.0
    for _ in range(30):
        ledger.record_step(q1, s1)
    assert ledger.epsilon() == els_epsilon(q1, s1, k, 30, 1e-5)
    for _ in range(20):
        ledger.record_step(q2, s2)
    composed = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(mog_step(q1, s1, k), 30),
            dp_accounting.SelfComposedDpEvent(mog_step(q2, s2, k), 20),
        ]
    )
    expected = direct_accountant("pld").compose(composed).get_epsilon(1e-5)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-4)
    # User-level accounting of k units costs more than unit-level DP-SGD.
    assert (
        ledger.epsilon()
        > PrivacyLedger(unit="user", delta=1e-5, segments=ledger.segments).epsilon()
    )


def test_els_ledger_round_trips_through_json(empty_privacy_cache):
    ledger = PrivacyLedger(unit="user", delta=1e-6, els_bound=3)
    for _ in range(10):
        ledger.record_step(0.02, 1.3)
    d = json.loads(json.dumps(ledger.to_dict()))
    assert d["els_bound"] == 3
    restored = PrivacyLedger.from_dict(d)
    assert restored == ledger and restored.els_bound == 3
    assert restored.epsilon() == ledger.epsilon()


def test_ledger_from_a_dict_written_before_els_bound():
    old = {"unit": "pair", "delta": 1e-5, "accountant": "pld", "segments": [[0.01, 1.0, 50]]}
    ledger = PrivacyLedger.from_dict(old)
    assert ledger.els_bound is None
    assert ledger.epsilon() == epsilon(0.01, 1.0, 50, 1e-5)
    assert ledger.to_dict() == {**old, "els_bound": None}


def test_els_ledger_with_bound_one_is_dp_sgd():
    segments = [[0.02, 1.1, 40]]
    els = PrivacyLedger(unit="user", delta=1e-5, segments=segments, els_bound=1)
    plain = PrivacyLedger(unit="user", delta=1e-5, segments=segments)
    assert els.epsilon() == plain.epsilon()


def test_els_ledger_max_more_steps(empty_privacy_cache):
    from privdpo.privacy.els_accounting import els_epsilon, els_max_steps_within

    q, sigma, k, target = 0.02, 1.5, 3, 2.0
    fresh = PrivacyLedger(unit="user", delta=1e-5, els_bound=k)
    assert fresh.max_more_steps(q, sigma, target) == els_max_steps_within(target, 1e-5, q, sigma, k)
    ledger = PrivacyLedger(unit="user", delta=1e-5, segments=[[q, sigma, 20]], els_bound=k)
    more = ledger.max_more_steps(q, sigma, target)
    assert 0 < more
    assert els_epsilon(q, sigma, k, 20 + more, 1e-5) <= target
    assert els_epsilon(q, sigma, k, 20 + more + 1, 1e-5) > target


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"unit": "user", "els_bound": 0}, "els_bound"),
        ({"unit": "user", "els_bound": True}, "els_bound"),
        ({"unit": "user", "els_bound": 2.5}, "els_bound"),
        ({"unit": "pair", "els_bound": 4}, "unit must be 'user'"),
        ({"unit": "user", "els_bound": 4, "accountant": "rdp"}, "accountant='pld'"),
    ],
)
def test_invalid_els_bound_says_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyLedger(delta=1e-5, **kwargs)


def test_ledger_from_dict_rejects_unknown_keys_but_names_els_bound():
    d = {"unit": "user", "delta": 1e-5, "accountant": "pld", "segments": [], "k": 3}
    with pytest.raises(ValueError, match="unknown \\['k'\\]") as error:
        PrivacyLedger.from_dict(d)
    assert "els_bound" in str(error.value)


# ---- epsilons ahead of the step (a background thread) --------------------------------------
def _slow_epsilon(calls, seconds=0.05):
    def epsilon_of(key):
        calls.append(key)
        time.sleep(seconds)
        return float(sum(steps for _, _, steps in key))

    return epsilon_of


def test_epsilons_ahead_equal_the_ledgers_and_are_computed_once():
    from privdpo.privacy.dpsgd import EpsilonAhead

    ledger = PrivacyLedger(unit="pair", delta=1e-5)
    keys = {s: ledger.key_after(s, 0.1, 1.0) for s in (1, 2, 3)}
    calls = []
    ahead = EpsilonAhead(keys, _slow_epsilon(calls))
    # Asked at once for step 3: the thread is on step 1, so the caller computes step 3
    # itself and the thread skips it; step 1 and 2 come from the thread.
    assert ahead.get(3, keys[3]) == 3.0
    assert ahead.get(1, keys[1]) == 1.0
    assert ahead.get(2, keys[2]) == 2.0
    deadline = time.monotonic() + 5
    while ahead.current is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(calls) == sorted(keys.values())  # each key once, none twice
    # A key not planned (another noise) is computed on the spot.
    other = ledger.key_after(1, 0.1, 2.0)
    assert ahead.get(1, other) == 1.0 and calls[-1] == other


def test_stopped_epsilons_ahead_compute_no_more_keys():
    from privdpo.privacy.dpsgd import EpsilonAhead

    ledger = PrivacyLedger(unit="pair", delta=1e-5)
    keys = {s: ledger.key_after(s, 0.1, 1.0) for s in range(1, 201)}
    calls = []
    ahead = EpsilonAhead(keys, _slow_epsilon(calls, 0.02))
    ahead.stop()
    time.sleep(0.3)
    assert len(calls) <= 2  # at most the key it was on when stopped


def test_a_budget_stop_plans_no_epsilon_past_the_budget():
    from privdpo.config import PrivacyConfig
    from privdpo.models import build_preset
    from privdpo.privacy.dpsgd import DPSGD
    from privdpo.privacy.planning import PrivacyPlan

    plan = PrivacyPlan(
        unit="pair",
        num_units=32,
        sampling_rate=0.25,
        steps=200,
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        delta=1e-3,
        accountant="pld",
        epsilon=math.inf,
        target_epsilon=3.0,
    )
    config = PrivacyConfig(enabled=True, noise_multiplier=0.8, target_epsilon=3, delta=1e-3)

    model, _ = build_preset("tiny")
    engine = DPSGD(model, plan, config, seed=0, groups=[[i] for i in range(32)])
    assert engine.budget_steps == max_steps_within(3.0, 1e-3, 0.25, 0.8, "pld") < 200
    engine.plan_logged_epsilons(list(range(1, 201)))
    planned = engine._epsilon_ahead.keys
    engine.stop_epsilons()
    assert max(planned) == engine.budget_steps
    assert planned[engine.budget_steps] == ((0.25, 0.8, engine.budget_steps),)
