"""User-level DP math (ELS and ULS): against dp-accounting called directly and hand arithmetic."""

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from privdpo.privacy import els_accounting
from privdpo.privacy.accounting import calibrate_noise, epsilon
from privdpo.privacy.contributions import cap_contributions, units_per_user
from privdpo.privacy.els_accounting import (
    calibrate_els_noise,
    els_epsilon,
    els_group_epsilon,
    els_max_steps_within,
    els_step_event,
)
from privdpo.privacy.ledger import PrivacyLedger
from privdpo.privacy.planning import (
    PlanRow,
    default_bound_els,
    default_bound_uls,
    default_candidates,
    format_plan,
    plan_user_level,
    uls_predictions,
)


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch):
    """Each test gets an empty disk cache: nothing is read from or written to ~/.cache."""
    directory = tmp_path / "privdpo-cache"
    monkeypatch.setenv(els_accounting.CACHE_DIR_ENV, str(directory))
    return directory


def binomial_pmf(k, q):
    """P(J = j), J ~ Binomial(k, q), by the textbook formula (small k only)."""
    return [math.comb(k, j) * q**j * (1 - q) ** (k - j) for j in range(k + 1)]


def direct_mog_epsilon(q, sigma, k, steps, delta):
    """ELS epsilon as a user of dp-accounting would compute it, written out here."""
    step = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        standard_deviation=sigma,
        sensitivities=list(range(k + 1)),
        sampling_probs=binomial_pmf(k, q),
    )
    accountant = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
    )
    return accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps)).get_epsilon(delta)


# (q, sigma, k, steps, delta) -> epsilon observed from `direct_mog_epsilon` with
# dp-accounting 0.6.0; a change of the library's numbers fails here.
PINNED_ELS = {
    (0.01, 1.0, 4, 1000, 1e-5): 8.899432616445864,
    (0.05, 2.0, 2, 100, 1e-6): 2.7241399776559323,
}


# ---------------------------------------------------------------------------
# ELS accounting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(PINNED_ELS))
def test_els_epsilon_matches_dp_accounting_mixture_of_gaussians(case):
    q, sigma, k, steps, delta = case
    ours = els_epsilon(q, sigma, k, steps, delta)
    direct = direct_mog_epsilon(q, sigma, k, steps, delta)
    assert ours == pytest.approx(direct, abs=1e-4)
    assert ours == pytest.approx(PINNED_ELS[case], rel=1e-4)


def test_els_step_event_is_the_binomial_mixture():
    event = els_step_event(0.1, 1.5, 3)
    assert event.standard_deviation == 1.5
    assert list(event.sensitivities) == [0, 1, 2, 3]
    # (0.9^3, 3 * 0.1 * 0.9^2, 3 * 0.1^2 * 0.9, 0.1^3)
    assert list(event.sampling_probs) == pytest.approx([0.729, 0.243, 0.027, 0.001])


def test_els_with_one_unit_per_user_is_dp_sgd():
    q, sigma, steps, delta = 0.02, 1.1, 300, 1e-5
    assert els_epsilon(q, sigma, 1, steps, delta) == epsilon(q, sigma, steps, delta)
    # The shortcut is exact: the MoG with Binomial(1, q) is the subsampled Gaussian.
    assert direct_mog_epsilon(q, sigma, 1, steps, delta) == pytest.approx(
        epsilon(q, sigma, steps, delta), abs=1e-6
    )
    assert calibrate_els_noise(4.0, delta, q, 1, steps) == calibrate_noise(4.0, delta, q, steps)


def test_els_with_every_unit_sampled_is_a_gaussian_of_sensitivity_k():
    # q = 1: the user's k units are in every batch and move the sum by k C, so the step is
    # the Gaussian mechanism with noise multiplier sigma / k.
    sigma, k, steps, delta = 6.0, 3, 10, 1e-5
    assert els_epsilon(1.0, sigma, k, steps, delta) == pytest.approx(
        epsilon(1.0, sigma / k, steps, delta), abs=1e-6
    )


def test_els_epsilon_grows_with_the_bound_and_the_steps():
    q, sigma, delta = 0.01, 1.0, 1e-5
    by_k = [els_epsilon(q, sigma, k, 200, delta) for k in (1, 2, 4)]
    assert by_k[0] < by_k[1] < by_k[2]
    assert els_epsilon(q, sigma, 2, 100, delta) < els_epsilon(q, sigma, 2, 200, delta)


def test_els_edge_cases():
    assert els_epsilon(0.01, 0.0, 3, 10, 1e-5) == math.inf
    assert els_epsilon(0.01, 1.0, 3, 0, 1e-5) == 0.0
    assert els_group_epsilon(0.01, 1.0, 3, 0, 1e-5) == 0.0
    assert els_group_epsilon(0.01, 0.0, 3, 10, 1e-5) == math.inf
    assert els_max_steps_within(1.0, 1e-5, 0.5, 0.0, 3) == 0


@pytest.mark.parametrize(
    "q,sigma,k,steps", [(0.01, 1.0, 4, 1000), (0.05, 2.0, 2, 100), (0.002, 3.0, 16, 500)]
)
def test_tight_els_epsilon_is_below_the_group_privacy_bound(q, sigma, k, steps):
    delta = 1e-5
    assert els_epsilon(q, sigma, k, steps, delta) < els_group_epsilon(q, sigma, k, steps, delta)


def test_group_bound_is_valid_and_smallest_on_its_grid():
    q, sigma, k, steps, delta = 0.01, 1.0, 4, 1000, 1e-5
    group = els_group_epsilon(q, sigma, k, steps, delta)
    # Unit-level DP-SGD privacy profile, from dp-accounting directly.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
    ).compose(event)

    def group_delta(eps1):  # k-fold group privacy: delta1 * (1 + e^eps1 + ... + e^{(k-1)eps1})
        return accountant.get_delta(eps1) * sum(math.exp(i * eps1) for i in range(k))

    eps1 = group / k
    assert group_delta(eps1) <= delta
    assert group_delta(eps1 - 2e-4) > delta  # no smaller eps1 on the 1e-4 grid would do
    # With one unit per user, group privacy is no loss: the unit-level epsilon (to the grid).
    assert els_group_epsilon(q, sigma, 1, steps, delta) == pytest.approx(
        epsilon(q, sigma, steps, delta), abs=2e-4
    )


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_calibrate_els_noise_lands_within_one_percent_below_target(target):
    q, k, steps, delta = 0.01, 4, 1000, 1e-5
    sigma = calibrate_els_noise(target, delta, q, k, steps)
    assert 0.99 * target <= els_epsilon(q, sigma, k, steps, delta) <= target
    # The smallest such sigma, up to the 1% window: 3% less noise exceeds the target.
    assert els_epsilon(q, 0.97 * sigma, k, steps, delta) > target


def test_calibrate_els_noise_orders():
    q, steps, delta = 0.01, 300, 1e-5
    loose = calibrate_els_noise(8.0, delta, q, 3, steps)
    tight = calibrate_els_noise(2.0, delta, q, 3, steps)
    assert tight > loose  # a smaller budget needs more noise
    assert calibrate_els_noise(2.0, delta, q, 6, steps) > tight  # so does a larger bound


def test_els_max_steps_within():
    q, sigma, k, delta, target = 0.01, 1.5, 3, 1e-5, 3.0
    steps = els_max_steps_within(target, delta, q, sigma, k)
    assert steps > 0
    assert (
        els_epsilon(q, sigma, k, steps, delta)
        <= target
        < els_epsilon(q, sigma, k, steps + 1, delta)
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: els_epsilon(0.01, 1.0, 4, 10, 1e-5, accountant="rdp"),
        lambda: calibrate_els_noise(4.0, 1e-5, 0.01, 4, 10, accountant="rdp"),
        lambda: els_max_steps_within(4.0, 1e-5, 0.01, 1.0, 4, accountant="rdp"),
    ],
)
def test_rdp_is_refused_for_els_and_the_fix_is_named(call):
    with pytest.raises(ValueError, match="accountant='pld'"):
        call()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: els_epsilon(0.01, 1.0, 0, 10, 1e-5), "k"),
        (lambda: els_epsilon(0.01, 1.0, True, 10, 1e-5), "k"),
        (lambda: els_epsilon(1.5, 1.0, 2, 10, 1e-5), "sampling_rate"),
        (lambda: els_group_epsilon(0.01, -1.0, 2, 10, 1e-5), "noise_multiplier"),
        (lambda: calibrate_els_noise(4.0, 1e-5, 0.01, 2, 0), "steps"),
        (lambda: calibrate_els_noise(0.0, 1e-5, 0.01, 2, 10), "target_epsilon"),
        (lambda: els_max_steps_within(4.0, 1.0, 0.01, 1.0, 2), "delta"),
        (lambda: cap_contributions(["a"], 0, 0), "k"),
        (lambda: cap_contributions([1, 2], 1, 0), "user ids"),
        (lambda: default_bound_els([]), "counts"),
        (lambda: default_bound_els([3, 0]), "counts"),
        (lambda: uls_predictions([1, 2], 0, 10, 1.0, 1e-5), "batch_size"),
        (lambda: uls_predictions([1, 2], 1, 10, 1.0, 1e-5, candidates=[0]), "candidates"),
    ],
)
def test_invalid_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------


def test_disk_cache_is_json_and_read_back(private_cache_dir):
    value = els_epsilon(0.03, 1.7, 3, 50, 1e-5)
    files = list(private_cache_dir.rglob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["value"] == value and record["key"]["k"] == 3
    # The file is read back (made recognisable here), so a new process starts warm.
    record["value"] = 123.0
    files[0].write_text(json.dumps(record))
    assert els_epsilon(0.03, 1.7, 3, 50, 1e-5) == 123.0
    # A ledger asks at every logged step: it keeps its values in memory only.
    ledger = PrivacyLedger(unit="user", delta=1e-5, els_bound=3)
    ledger.record_step(0.03, 1.7)
    ledger.epsilon()
    assert len(list(private_cache_dir.rglob("*.json"))) == 1


def test_disk_cache_off_with_empty_directory_name(private_cache_dir, monkeypatch):
    monkeypatch.setenv(els_accounting.CACHE_DIR_ENV, "")
    els_epsilon(0.03, 1.9, 3, 50, 1e-5)
    calibrate_els_noise(4.0, 1e-5, 0.03, 3, 50)
    assert not private_cache_dir.exists()


def test_calibration_is_cached_on_disk(private_cache_dir):
    sigma = calibrate_els_noise(4.0, 1e-5, 0.03, 2, 50)
    records = [json.loads(f.read_text()) for f in private_cache_dir.rglob("*.json")]
    assert [r["value"] for r in records if r["key"]["kind"] == "els_sigma"] == [sigma]


# ---------------------------------------------------------------------------
# Capping contributions
# ---------------------------------------------------------------------------


def interleaved_users():
    """Users u0..u29 holding 1..30 units, interleaved in the unit order."""
    return [f"u{i}" for n in range(30) for i in range(30) if n <= i]


def test_units_per_user_counts_in_first_appearance_order():
    assert units_per_user(["b", "a", "b", "c", "b"]) == {"b": 3, "a": 1, "c": 1}
    assert list(units_per_user(["b", "a", "b"])) == ["b", "a"]


def test_cap_contributions_keeps_min_of_count_and_bound():
    users = interleaved_users()
    counts = units_per_user(users)
    for k in (1, 4, 30):
        kept = cap_contributions(users, k, seed=0)
        assert kept == sorted(set(kept))
        assert units_per_user([users[i] for i in kept]) == {u: min(n, k) for u, n in counts.items()}


def test_cap_contributions_is_deterministic_and_depends_on_the_seed():
    users = interleaved_users()
    assert cap_contributions(users, 4, seed=1) == cap_contributions(users, 4, seed=1)
    assert cap_contributions(users, 4, seed=1) != cap_contributions(users, 4, seed=2)


def test_cap_contributions_is_the_same_in_another_process():
    users = interleaved_users()
    code = (
        "import json, sys; from privdpo.privacy.contributions import cap_contributions;"
        "print(json.dumps(cap_contributions(json.loads(sys.argv[1]), 4, 7)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(users)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == cap_contributions(users, 4, 7)


def test_cap_contributions_chooses_uniformly():
    # One user with 4 units capped at 2: each of the 6 pairs about 1/6 of the time.
    seen = {}
    for seed in range(1200):
        kept = tuple(cap_contributions(["x"] * 4, 2, seed))
        seen[kept] = seen.get(kept, 0) + 1
    assert len(seen) == 6
    assert all(140 <= n <= 260 for n in seen.values())  # mean 200, sd about 13


# ---------------------------------------------------------------------------
# Default bounds
# ---------------------------------------------------------------------------


def test_default_bound_els_is_the_median():
    # 11 users: sorted 1 1 1 1 1 2 2 2 3 50 200 -> the 6th value, 2.
    odd = [200, 1, 2, 1, 50, 1, 2, 3, 1, 2, 1]
    assert default_bound_els(odd) == 2
    # 10 users: sorted 1 1 1 1 1 2 2 2 50 200 -> middle values 1 and 2 -> ceil(1.5) = 2.
    even = [200, 1, 2, 1, 50, 1, 2, 1, 2, 1]
    assert default_bound_els(even) == 2
    # 4 users: 1 1 10 10 -> ceil(5.5) = 6.
    assert default_bound_els([10, 1, 10, 1]) == 6
    assert default_bound_els([7]) == 7


def test_default_candidates():
    # Largest count 100: powers of two up to 64, plus the median 1.
    assert default_candidates([1] * 90 + [10] * 8 + [100] * 2) == [1, 2, 4, 8, 16, 32, 64]
    # Largest 5000: 13 powers of two (1..4096), every second one kept, plus the median 3.
    many = default_candidates([3, 3, 5000])
    assert many == [1, 3, 4, 16, 64, 256, 1024, 4096]
    assert len(many) <= 12


SKEWED = [1] * 90 + [10] * 8 + [100] * 2  # 100 users, 370 units
# Units kept, 90 * 1 + 8 * min(10, k) + 2 * min(100, k), worked out by hand; m_k = kept / 100.
KEPT = {1: 100, 2: 110, 4: 130, 8: 170, 16: 202, 32: 234, 64: 298}


def test_uls_predictions_by_hand():
    batch_size, steps, target, delta = 10, 50, 4.0, 1e-4
    expected = {}
    for k, kept in KEPT.items():
        m_k = kept / 100
        q_u = batch_size / kept  # = batch_size / (m_k * users), below 1 for every k here
        sigma = calibrate_noise(target, delta, q_u, steps)
        expected[k] = (m_k, q_u, sigma, sigma * m_k / batch_size)

    predictions = uls_predictions(SKEWED, batch_size, steps, target, delta)
    assert [p.k for p in predictions] == list(KEPT)
    for p in predictions:
        m_k, q_u, sigma, noise = expected[p.k]
        assert (p.users, p.units_kept, p.units_dropped) == (100, KEPT[p.k], 370 - KEPT[p.k])
        assert p.mean_units_per_user == pytest.approx(m_k)
        assert p.sampling_rate == pytest.approx(q_u)
        assert p.users_per_step == pytest.approx(batch_size / m_k)
        assert p.noise_multiplier == pytest.approx(sigma)
        assert p.predicted_noise == pytest.approx(noise)


def test_uls_sampling_rate_is_capped_at_one():
    # 3 users of 2 units, 10 units per step: every user every step, noise / all users.
    (p,) = uls_predictions([2, 2, 2], 10, 5, 4.0, 1e-2, candidates=[2])
    assert p.sampling_rate == 1.0 and p.users_per_step == 3
    assert p.noise_multiplier == calibrate_noise(4.0, 1e-2, 1.0, 5)
    assert p.predicted_noise == pytest.approx(p.noise_multiplier / 3)


# ---------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------


def test_plan_rows_for_both_algorithms():
    batch_size, steps, target, delta = 10, 100, 4.0, 1e-4
    rows = plan_user_level(SKEWED, batch_size, steps, target, delta, candidates=[2, 4])
    # The defaults are added to the candidates: ELS's median 1, ULS's 16 (202 of 370 kept).
    assert [(r.algorithm, r.k) for r in rows] == [
        ("els", 1),
        ("els", 2),
        ("els", 4),
        ("els", 16),
        ("uls", 1),
        ("uls", 2),
        ("uls", 4),
        ("uls", 16),
    ]
    for r in rows:
        kept = KEPT[r.k]
        assert (r.users, r.units_kept, r.units_dropped) == (100, kept, 370 - kept)
        if r.algorithm == "els":
            q = batch_size / kept
            sigma = calibrate_els_noise(target, delta, q, r.k, steps)
            assert r.sampling_rate == pytest.approx(q)
            assert r.noise_multiplier == sigma
            assert r.predicted_noise == pytest.approx(sigma / batch_size)
            assert r.is_default == (r.k == 1)
        assert r.units_per_step == pytest.approx(batch_size)
    assert [r.k for r in rows if r.algorithm == "uls" and r.is_default] == [
        default_bound_uls(SKEWED)
    ]
    # ELS with k = 1 and ULS with k = 1 are the same DP-SGD run.
    assert rows[0].noise_multiplier == rows[4].noise_multiplier


def test_format_plan_is_a_fixed_width_table_with_the_defaults_marked():
    rows = [
        PlanRow("els", 1, 100, 100, 270, 0.1, 10.0, 1.25, 0.125, False),
        PlanRow("els", 16, 100, 202, 168, 0.0495, 10.0, 2.5, 0.25, True),
        PlanRow("uls", 1, 100, 100, 270, 0.1, 10.0, 1.25, 0.125, True),
    ]
    lines = format_plan(rows).splitlines()
    header, rule, *body, legend = lines
    assert header.split()[:3] == ["algo", "k", "users"]
    assert set(rule) == {"-"}
    assert [line.split()[:2] for line in body] == [["ELS", "1"], ["ELS", "16"], ["ULS", "1"]]
    assert [line.endswith("*") for line in body] == [False, True, True]
    # Columns line up: each row's sigma ends where the header's "sigma" ends.
    end = header.index("sigma") + len("sigma")
    assert [line[end - 4 : end] for line in body] == ["1.25", " 2.5", "1.25"]
    assert "default" in legend


def test_default_bound_uls_keeps_half_of_the_units_within_the_measured_range():
    # 3 users of 1, 1 of 8, 1 of 40 units (51): k = 1 keeps 5, 2 keeps 7, 4 keeps 11,
    # 8 keeps 19, 16 keeps 27 >= 25.5: k = 16.
    assert default_bound_uls([1, 1, 1, 8, 40]) == 16
    # Half of the units already at k = 1 (one unit each, mostly).
    assert default_bound_uls([1] * 10 + [3]) == 1
    # 24 of 36 units kept at k = 4 (12 at k = 2): the smallest power of two with half.
    assert default_bound_uls([4, 4, 4, 4, 4, 16]) == 4
    # Never beyond the measured 16, nor the largest count.
    assert default_bound_uls([1, 1000]) == 16
    assert default_bound_uls([3, 3, 3]) == 2  # 6 of 9 kept


def test_the_user_level_example_states_the_default_rule():
    """The example's comment on contribution_bound names the rule default_bound_uls uses
    (it once said "least predicted noise", which always chose k = 1)."""
    text = (Path(__file__).resolve().parents[1] / "examples/dpo_user_private.yaml").read_text()
    comment = text[text.index("contribution_bound:") :].split("target_epsilon")[0]
    assert "smallest power of two" in comment and "at most 16" in comment
    assert "median per user" in comment
    assert "least predicted noise" not in text
