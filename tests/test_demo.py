"""A reduced demo end to end (fewer reviews and prompts): the direction of the effect, and
that the demo page, every run's report and the DP run's privacy statement are there and
say what the runs did. `make demo` itself (the full size) runs in test_readme."""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
from collections import Counter

import pytest

from privdpo.cli import main
from privdpo.privacy.accounting import epsilon


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A reduced demo: (its directory, demo.json, what it printed)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    args = [
        "demo",
        f"output.dir={out}",
        "demo.reviews=2800",
        "demo.pair_prompts=250",
        "demo.eval_prompts=100",
        "demo.frontier_betas=[0.5]",
        "demo.frontier_epsilons=[]",
        "demo.checkpoints=2",
        "demo.best_of_n=[2,4]",
    ]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(args) == 0
    return out, json.loads((out / "demo.json").read_text()), console.getvalue()


def test_dpo_raises_the_sentiment_reward_over_sft(demo):
    _, summary, _ = demo
    rows = {r["model"]: r for r in summary["table"]}
    kinds = [r["kind"] for r in summary["table"]]
    assert kinds[:3] == ["sft", "best-of-n", "best-of-n"] and "dpo-step" in kinds
    assert {"SFT", "best-of-2", "best-of-4", "DPO beta=1", "DPO beta=0.5", "DP-DPO eps=8"} <= set(
        rows
    )
    sft, dpo = rows["SFT"]["reward"], rows["DPO beta=1"]["reward"]
    # DPO's whole interval lies above SFT's mean reward.
    assert dpo["ci_low"] > sft["value"], (sft, dpo)
    assert rows["DPO beta=1"]["positive_rate"] > rows["SFT"]["positive_rate"]
    assert rows["DPO beta=1"]["win_rate"]["value"] > 0.5
    for r in summary["table"]:
        if r["kind"] in ("dpo", "dpo-step", "dp"):
            assert r["kl"] > 0 and not r["kl_is_bound"]
    # best-of-n: its KL is the bound log n - (n-1)/n; more samples, more reward
    assert rows["best-of-4"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert rows["best-of-4"]["reward"]["value"] > rows["best-of-2"]["reward"]["value"]
    # the checkpoint along training is an earlier model than the run's end
    step = next(r for r in summary["table"] if r["kind"] == "dpo-step")
    assert step["kl"] < rows["DPO beta=1"]["kl"]


def test_the_verdicts_are_computed_from_the_table(demo):
    _, summary, console = demo
    rows = {r["model"]: r for r in summary["table"]}
    first, second = summary["verdicts"]
    near = [r for r in summary["table"] if r["kind"] in ("dpo", "dpo-step") and r["kl"] <= 5]
    best = max(near, key=lambda r: r["reward"]["value"])
    assert first["model"] == best["model"]
    assert first["held"] == (best["reward"]["value"] >= rows["best-of-4"]["reward"]["value"])
    sft = rows["SFT"]["reward"]["value"]
    share = (rows["DP-DPO eps=8"]["reward"]["value"] - sft) / (
        rows["DPO beta=1"]["reward"]["value"] - sft
    )
    assert second["share"] == pytest.approx(share) and second["held"] == (share >= 0.6)
    for v in summary["verdicts"]:
        assert v["text"] in console


def test_the_dp_run_states_user_level_privacy(demo):
    out, summary, _ = demo
    statement = json.loads((out / "dp-dpo" / "model" / "privacy.json").read_text())
    assert statement == summary["privacy"]
    assert statement["level"] == "user-level" and statement["user_algorithm"] == "ULS"
    assert 0.99 * 8 <= statement["epsilon"] <= 8
    assert statement["epsilon"] == pytest.approx(
        epsilon(
            statement["sampling_rate"],
            statement["noise_multiplier"],
            statement["steps"],
            statement["delta"],
        ),
        rel=1e-9,
    )
    # The users are the reviewers of the prompts the pairs came from (the training split).
    pairs = [json.loads(line) for line in (out / "data" / "pairs.jsonl").open()]
    assert 0 < statement["users"] <= len({p["user_id"] for p in pairs})
    assert statement["units_kept"] + statement["units_dropped"] < len(pairs)  # eval held out
    assert statement["units_kept"] <= statement["users"] * statement["contribution_bound"]


def test_the_statement_is_end_to_end_and_matches_the_lineage(demo):
    """The tokenizer and SFT saw only public reviewers: the DP-DPO statement's end-to-end
    bound is its own epsilon by parallel composition, and the lineage says why."""
    out, summary, _ = demo
    statement = summary["privacy"]
    end = statement["end_to_end"]
    assert end["composition"] == "parallel" and end["no_guarantee"] == []
    assert end["epsilon"] == statement["stage_epsilon"] == statement["epsilon"]
    assert [s["recipe"] for s in end["parallel_stages"]] == ["tokenizer fit", "sft"]
    assert all(s["overlapping_users"] == 0 for s in end["parallel_stages"])
    lineage = json.loads((out / "dp-dpo" / "model" / "lineage.json").read_text())
    assert [s["recipe"] for s in lineage["stages"]] == ["tokenizer fit", "sft", "dpo"]
    assert lineage["stages"][-1]["ledger"] == statement["ledger"]
    # No reviewer is on both sides of the split.
    pairs = [json.loads(line) for line in (out / "data" / "pairs.jsonl").open()]
    public = [json.loads(line) for line in (out / "data" / "public_reviews.jsonl").open()]
    assert not {p["user_id"] for p in pairs} & {r["user_id"] for r in public}
    report = (out / "dp-dpo" / "report.html").read_text()
    assert "parallel composition" in report
    assert f"epsilon = {statement['epsilon']:.4g}" in statement["summary"]


def test_the_printed_and_shown_statement_is_the_runs_ledger(demo):
    """What the demo prints and shows about privacy is the DP-DPO run's own statement, and
    `privdpo privacy verify` reproduces its epsilons from the ledger."""
    from privdpo.demo import privacy_lines
    from privdpo.privacy.verify import verify

    out, summary, console = demo
    statement = json.loads((out / "dp-dpo" / "privacy.json").read_text())
    assert summary["privacy"] == statement
    assert privacy_lines(statement) in console
    assert f"this stage epsilon = {statement['stage_epsilon']:.4g}" in console
    assert f"end to end epsilon = {statement['end_to_end']['epsilon']:.4g}" in console
    page = (out / "demo.html").read_text()
    assert html.escape(statement["summary"]) in page
    checks = verify(out / "dp-dpo")
    assert checks and all(c["matches"] for c in checks), checks


def test_the_demo_page_and_every_report_exist(demo):
    out, summary, _ = demo
    page = (out / "demo.html").read_text()
    for row in summary["table"]:
        assert row["model"] in page
        assert f"{row['reward']['value']:.3f}" in page
    assert 'data-figure="frontier"' in page
    for run in ("sft", "dpo", "dp-dpo", "dpo-beta-0.5"):
        assert (out / run / "report.html").is_file(), run
        assert f"{run}/report.html" in page
    assert (out / "dpo" / "eval.json").is_file()
    for v in summary["verdicts"]:
        assert html.escape(v["text"]) in page


def test_a_foreign_directory_is_never_replaced(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", f"output.dir={tmp_path}"]) == 2
    assert "not a finished privdpo demo directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_the_split_gives_each_private_reviewer_at_most_the_set_number_of_prefixes():
    from privdpo.demo import split_by_reviewer
    from privdpo.demo_corpus import generate_reviews

    reviews = generate_reviews(3000, seed=3)
    for per in (1, 2, 100):
        private, public = split_by_reviewer(reviews, 400, per, seed=3)
        assert len(private) == 400
        counts = Counter(r["user_id"] for r in private)
        assert max(counts.values()) <= per
        assert not set(counts) & {r["user_id"] for r in public}
        # nothing is duplicated, and only private reviewers' other reviews are left out
        kept = {id(r) for r in private} | {id(r) for r in public}
        assert len(kept) == len(private) + len(public)
        left_out = [r for r in reviews if id(r) not in kept]
        assert all(r["user_id"] in counts for r in left_out)
    # one prefix each: as many private reviewers as prefixes
    private, _ = split_by_reviewer(reviews, 400, 1, seed=3)
    assert len({r["user_id"] for r in private}) == 400


def test_too_few_public_reviews_is_a_clear_error(tmp_path, capsys):
    """1,500 private reviewers with one prefix each use most of 3,400 reviews: the demo
    says which key to change before it trains anything."""
    out = tmp_path / "demo"
    assert main(["demo", f"output.dir={out}", "demo.reviews=3400"]) == 2
    err = capsys.readouterr().err
    assert "demo.reviews: 3400 reviews leave" in err and "raise demo.reviews" in err
    assert "Traceback" not in err
    assert not (out / "sft").exists()
