"""The privacy audit: the one-run bound against a direct computation, and `privdpo audit`
on a tiny model: a memorizing non-private run is caught, DP runs stay below their proven
epsilon, and a planted bug (noise 4x smaller than the accountant assumes) is caught by
white-box canaries with a failing exit."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random

import numpy as np
import pytest
import yaml
from scipy import stats

from conftest import Crash, sft_rows, write_jsonl
from privdpo.cli import main
from privdpo.config import AuditConfig, EvalModelConfig, SFTRunConfig, load_config
from privdpo.data.sft import load_sft_data
from privdpo.errors import UserError
from privdpo.models import AUDIT_MARKER, load_model_and_tokenizer
from privdpo.privacy.audit import (
    choose_and_bound,
    epsilon_lower_bound,
    guesses,
    p_value,
    split_halves,
)
from privdpo.privacy.dpsgd import DPSGD
from privdpo.recipes.audit import Canaries, run_scores
from privdpo.recipes.eval import ModelSource, load_source


def direct_p_value(m, r, v, eps, delta):
    """Theorem 5.2 of Steinke, Nasr and Jagielski 2023, written out with scipy's binomial
    survival function and pmf (the module computes it from cdf differences)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    beta = stats.binom.sf(v - 1, r, p)
    alpha, band = 0.0, 0.0
    for i in range(1, v + 1):
        band += stats.binom.pmf(v - i, r, p)
        alpha = max(alpha, band / i)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m", [20, 200, 1000])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_against_a_direct_computation(m, delta):
    for r in sorted({1, m // 10, m // 2, m}):
        for v in sorted({0, r // 2, (3 * r) // 4, r}):
            for eps in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
                assert p_value(m, r, v, eps, delta) == pytest.approx(
                    direct_p_value(m, r, v, eps, delta), rel=1e-6, abs=1e-12
                ), (m, r, v, eps, delta)


def appendix_d_eps_audit(m, r, v, delta, p=0.05):
    """`get_eps_audit` of Steinke, Nasr and Jagielski 2023, Appendix D, written out here
    (its `p_value_DP_audit` with the loop over i as a cumulative sum of pmfs): the
    largest epsilon whose p-value is below p, by growing eps_max and bisecting."""

    def p_value_dp_audit(eps):
        q = 1 / (1 + math.exp(-eps))
        beta = stats.binom.sf(v - 1, r, q)
        i = np.arange(1, v + 1)
        band = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i]
        alpha = float(np.max(band / i)) if v > 0 else 0.0
        return min(beta + alpha * delta * 2 * m, 1)

    eps_min, eps_max = 0.0, 1.0
    while p_value_dp_audit(eps_max) < p:
        eps_max += 1
    for _ in range(60):
        eps = (eps_min + eps_max) / 2
        if p_value_dp_audit(eps) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


@pytest.mark.parametrize("m", [50, 500, 5000])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_the_lower_bound_against_appendix_d(m, delta):
    positive = 0
    for r in sorted({1, m // 10, m // 2, m}):
        for v in sorted({r // 2, (3 * r) // 4, (9 * r) // 10, r}):
            expected = appendix_d_eps_audit(m, r, v, delta)
            got = epsilon_lower_bound(m, r, v, delta)
            assert got == pytest.approx(expected, abs=1e-6), (m, r, v, delta)
            positive += expected > 0
    assert positive >= 3  # the grid reaches bounds above 0, not only the trivial answer


def test_the_lower_bound_is_the_largest_epsilon_ruled_out():
    for m, r, v, delta in [(1000, 100, 90, 1e-5), (200, 50, 50, 0.0), (500, 40, 30, 1e-6)]:
        eps = epsilon_lower_bound(m, r, v, delta)
        assert eps > 0
        assert direct_p_value(m, r, v, eps, delta) <= 0.05 + 1e-9
        assert direct_p_value(m, r, v, eps + 1e-3, delta) > 0.05
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance: nothing ruled out
    assert guesses([3.0, 1.0, 2.0, 5.0], 1, 1) == {1: False, 3: True}


def planted_scores(m: int, seed: int, separated_in_pick: int, separated_in_judge: int):
    """Inclusion and scores where the selection half separates only its top and bottom
    `separated_in_pick` canaries (noise in between), the evaluated half its top and bottom
    `separated_in_judge`: the best (k+, k-) differ between the halves."""
    rng = random.Random(seed)
    included = [rng.random() < 0.5 for _ in range(m)]
    scores = [rng.random() for _ in range(m)]  # noise in [0, 1)
    pick, judge = split_halves(m, seed)
    for half, separated in ((pick, separated_in_pick), (judge, separated_in_judge)):
        members = [i for i in half if included[i]]
        others = [i for i in half if not included[i]]
        for j, i in enumerate(members[:separated]):
            scores[i] = 10 + j  # far above the noise: sure "in" guesses
        for j, i in enumerate(others[:separated]):
            scores[i] = -10 - j
    return scores, included, pick, judge


def test_guesses_are_chosen_on_the_held_out_half_only():
    m, seed = 800, 3
    scores, included, pick, judge = planted_scores(m, seed, 10, 200)
    base = choose_and_bound(scores, included, 1e-5, seed)
    # The evaluated half permuted and relabelled at random: (k+, k-) stay as they were.
    rng = random.Random(1)
    values = [scores[i] for i in judge]
    rng.shuffle(values)
    shuffled, relabelled = list(scores), list(included)
    for i, value in zip(judge, values, strict=True):
        shuffled[i], relabelled[i] = value, rng.random() < 0.5
    other = choose_and_bound(shuffled, relabelled, 1e-5, seed)
    assert (other.k_in, other.k_out) == (base.k_in, base.k_out)
    assert other.correct < base.correct  # what changed is only the evaluated half
    # ... while the selection half decides them: separable throughout, larger k.
    wide, wide_included, _, _ = planted_scores(m, seed, 200, 200)
    assert choose_and_bound(wide, wide_included, 1e-5, seed).guesses > base.guesses


def test_a_perfect_separator_reaches_the_attainable_bound():
    rng = random.Random(0)
    included = [rng.random() < 0.5 for _ in range(1000)]
    scores = [float(inside) + 1e-6 * rng.random() for inside in included]
    result = choose_and_bound(scores, included, 1e-5, seed=0)
    assert result.guesses > 0 and result.correct == result.guesses
    assert result.epsilon_lower_bound == result.attainable_with_chosen_guesses > 0
    # every evaluated canary guessed right: a larger maximum, the bound's ceiling
    assert result.max_attainable == epsilon_lower_bound(500, 500, 500, 1e-5)
    assert result.max_attainable > result.attainable_with_chosen_guesses


def audit_config(tmp_path, *lines) -> str:
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(48))
    config = tmp_path / "audit.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        "train: {epochs: 6, batch_size: 32, micro_batch_size: 32, lr: 3.0e-3,"
        " eval_at_start: false, schedule: constant}\n"
        f"output: {{dir: {tmp_path / 'run'}, progress_bar: false}}\n" + "".join(lines)
    )
    return str(config)


@pytest.fixture(scope="module")
def memorizing_audit(tmp_path_factory):
    """A non-private audit run with 200 black-box canaries, which it memorizes; shared by
    the tests that read it. (directory, config path, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("memorizing-audit")
    config = audit_config(tmp_path, "audit: {canaries: 200}\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["audit", config]) == 0
    return tmp_path, config, printed.getvalue()


def test_a_memorizing_non_private_run_is_caught(memorizing_audit):
    tmp_path, _, printed = memorizing_audit
    out = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert out["proven_epsilon"] is None  # not private: nothing to compare
    assert out["empirical_epsilon_lower_bound"] >= 2
    assert out["correct"] > 0.9 * out["guesses"]
    bound, chosen, most = (
        out["empirical_epsilon_lower_bound"],
        out["attainable_with_chosen_guesses"],
        out["max_attainable"],
    )
    assert bound <= chosen <= most
    assert most == pytest.approx(epsilon_lower_bound(100, 100, 100, out["delta"]), abs=1e-9)
    assert (tmp_path / "run" / "model" / "AUDIT_RUN.txt").is_file()
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Privacy audit" in report and 'data-figure="audit-scores"' in report
    assert "max attainable (all 100 evaluated canaries guessed right)" in report
    assert "empirical lower bound" in printed
    assert f"attainable with these {out['guesses']} guesses" in printed
    assert "max attainable (all 100 guessed right)" in printed


def test_an_audit_model_is_refused_as_a_model_to_train_or_evaluate(memorizing_audit, capsys):
    tmp_path, _, _ = memorizing_audit
    model = tmp_path / "run" / "model"
    assert (model / AUDIT_MARKER).is_file()
    config = tmp_path / "from_audit_model.yaml"
    config.write_text(
        f"model: {{path: {model}}}\n"
        f"data: {{train: {tmp_path / 'sft.jsonl'}, eval_fraction: 0}}\n"
        f"output: {{dir: {tmp_path / 'from-audit-model'}, progress_bar: false}}\n"
    )
    capsys.readouterr()
    assert main(["sft", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model.path: {model} is a model trained by `privdpo audit`" in err
    assert "canaries" in err and "Traceback" not in err
    assert not (tmp_path / "from-audit-model").exists()  # refused before anything is written
    with pytest.raises(UserError, match="reference.path: .* trained by `privdpo audit`"):
        load_source(ModelSource("dir", str(model), model), EvalModelConfig(), "reference.path")


def test_a_normal_run_of_the_same_config_has_no_canaries_and_no_marker(memorizing_audit):
    """The audit's config without its `audit` section, trained by `privdpo sft`: nothing
    marked, no audit.json, and the canaries the audit run memorized are not in its model
    (scored on it, included and excluded canaries look alike)."""
    tmp_path, audit_config_path, _ = memorizing_audit
    raw = yaml.safe_load(open(audit_config_path, encoding="utf-8"))
    audit = AuditConfig(**raw.pop("audit"))
    raw["output"]["dir"] = str(tmp_path / "normal")
    config = tmp_path / "normal.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["sft", str(config)]) == 0
    normal = tmp_path / "normal"
    assert not list(normal.rglob(AUDIT_MARKER)) and not list(normal.rglob("audit.json"))
    # The audit's canaries, rebuilt as its run built them (same seed, data and tokenizer).
    cfg = load_config(SFTRunConfig, config, [])
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    train, _, _ = load_sft_data(
        cfg.data, tokenizer, cfg.sft.completion_only_loss, cfg.train.seed, cfg.scrub
    )
    canaries = Canaries(audit, "sft", None)
    canaries.training_items(train, tokenizer)
    audited = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert audited["empirical_epsilon_lower_bound"] >= 2
    # The same canaries: scored on the audit's own model, they give its recorded scores.
    on_audit_model = run_scores(canaries, tmp_path / "run", "float32", "cpu", audit_model_ok=True)
    assert on_audit_model == pytest.approx(audited["scores"], abs=1e-4)
    scores = run_scores(canaries, normal, "float32", "cpu", audit_model_ok=False)
    result = choose_and_bound(scores, canaries.included, 1e-5, audit.seed)
    assert result.epsilon_lower_bound == 0, result
    assert result.correct <= 0.75 * result.guesses


DP = ["privacy.enabled=true", "privacy.target_epsilon=1", "privacy.delta=1e-5"]


def private_audit(tmp_path, seed: int) -> None:
    config = audit_config(tmp_path, "audit: {canaries: 100}\n")
    assert (
        main(["audit", config, *DP, "train.epochs=2", f"audit.seed={seed}", f"train.seed={seed}"])
        == 0
    )
    out = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert out["proven_epsilon"] == pytest.approx(1, rel=0.01)
    assert out["empirical_epsilon_lower_bound"] < out["proven_epsilon"]
    assert not out["exceeds_proven"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_private_run_stays_below_its_proven_epsilon(tmp_path, seed):
    private_audit(tmp_path, seed)


WHITE_BOX = [
    *DP,
    "train.batch_size=16",
    "train.micro_batch_size=16",
    "train.epochs=12",
    "audit.mode=white_box",
    "audit.canaries=1000",
]


def test_white_box_canaries_catch_noise_smaller_than_the_accountant_assumes(
    tmp_path, capsys, monkeypatch
):
    config = audit_config(tmp_path)
    assert main(["audit", config, *WHITE_BOX]) == 0  # the implementation as it is
    honest = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert honest["empirical_epsilon_lower_bound"] < honest["proven_epsilon"]
    capsys.readouterr()
    true_std = DPSGD.noise_std
    monkeypatch.setattr(DPSGD, "noise_std", lambda self: true_std(self) / 4)  # the bug
    code = main(["audit", config, *WHITE_BOX, f"output.dir={tmp_path / 'buggy'}"])
    err = capsys.readouterr().err
    assert code == 2 and "is above the proven epsilon" in err and "Traceback" not in err
    buggy = json.loads((tmp_path / "buggy" / "audit.json").read_text())
    assert buggy["exceeds_proven"]
    assert buggy["empirical_epsilon_lower_bound"] > buggy["proven_epsilon"]


def test_white_box_needs_a_private_run(tmp_path, capsys):
    config = audit_config(tmp_path, "audit: {mode: white_box}\n")
    assert main(["audit", config]) == 2
    assert "privacy.enabled=false" in capsys.readouterr().err


def test_user_level_dpo_audit_uses_canary_users(tmp_path):
    """At user level a canary is a user with several canary pairs; its score sums them."""
    from test_dpo import marker_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(40))
    config = tmp_path / "audit.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        "train: {max_steps: 2, batch_size: 8, micro_batch_size: 8, eval_at_start: false}\n"
        "dpo: {beta: 0.1}\n"
        "privacy: {enabled: true, unit: user, contribution_bound: 2, noise_multiplier: 1.0}\n"
        "audit: {canaries: 20, items_per_user: 2}\n"
        f"output: {{dir: {tmp_path / 'run'}, progress_bar: false}}\n"
    )
    assert main(["audit", str(config)]) == 0
    out = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert out["design"]["unit"] == "user" and out["design"]["items_per_canary"] == 2
    assert len(out["scores"]) == len(out["included"]) == 20
    assert out["empirical_epsilon_lower_bound"] <= out["proven_epsilon"]


def dpo_audit_config(tmp_path, canaries: int, epochs: int) -> str:
    from test_dpo import marker_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(40))
    config = tmp_path / "dpo_audit.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        f"train: {{epochs: {epochs}, batch_size: 32, micro_batch_size: 32, lr: 3.0e-3,"
        " eval_at_start: false, schedule: constant}\n"
        "dpo: {beta: 0.1}\n"
        f"audit: {{canaries: {canaries}}}\n"
        f"output: {{dir: {tmp_path / 'run'}, progress_bar: false}}\n"
    )
    return str(config)


def test_black_box_pair_level_dpo_audit(tmp_path):
    """Canary pairs (a rare-token secret chosen over another) scored by their implicit
    reward margin: a non-private DPO run that memorizes them is caught, and a pair-level
    DP run at epsilon 1 stays below it."""
    config = dpo_audit_config(tmp_path, canaries=100, epochs=2)
    assert main(["audit", config]) == 0
    leaky = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert leaky["design"]["score"].startswith("implicit reward margin")
    assert leaky["design"]["unit"] == "(not private)" and leaky["design"]["items_per_canary"] == 1
    assert leaky["empirical_epsilon_lower_bound"] >= 1.5
    assert leaky["correct"] == leaky["guesses"] > 0
    private = [
        "privacy.enabled=true",
        "privacy.unit=pair",
        "privacy.target_epsilon=1",
        "privacy.delta=1e-5",
        f"output.dir={tmp_path / 'private'}",
    ]
    assert main(["audit", config, *private]) == 0
    out = json.loads((tmp_path / "private" / "audit.json").read_text())
    assert out["design"]["unit"] == "pair"
    assert out["proven_epsilon"] == pytest.approx(1, rel=0.01)
    assert out["empirical_epsilon_lower_bound"] < out["proven_epsilon"]
    assert out["max_attainable"] == leaky["max_attainable"]  # the same canaries, split


def test_an_audit_run_cut_short_after_export_is_marked(tmp_path, monkeypatch):
    """The marker is written at export, inside the recipe: a run that dies right after
    exporting (here as the audit scores its canaries) leaves a marked model, never an
    unmarked one."""
    import privdpo.recipes.audit

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(privdpo.recipes.audit, "run_scores", crash)
    config = dpo_audit_config(tmp_path, canaries=20, epochs=1)
    with pytest.raises(Crash):
        main(["audit", config])
    assert (tmp_path / "run" / "model" / AUDIT_MARKER).is_file()
    assert (tmp_path / "run" / AUDIT_MARKER).is_file()
    assert not (tmp_path / "run" / "audit.json").exists()  # the audit itself never ran
