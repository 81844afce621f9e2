"""`privdpo pairs`: selection rules on hand-made scores, pairs against a recomputation from
the same samples on a tiny model, the file loaded back as DPO data, and the real command
on a real tiny SFT run with the shipped example."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_jsonl
from privdpo.cli import build_parser, main
from privdpo.config import DataConfig, PairsRunConfig, load_config
from privdpo.data.preference import load_preference_data
from privdpo.errors import ConfigError, DataError
from privdpo.models import build_preset
from privdpo.pairs import (
    PromptSamples,
    make_pairs,
    read_prompt_rows,
    sample_completions,
    select_pairs,
    write_pairs,
)

PROMPTS = [
    {"prompt": "Write a short positive review of a movie.\n", "user_id": "u1"},
    {"prompt": "The phone was", "user_id": 7},
    {"prompt": "I loved this kettle. The", "user_id": "u1"},
    {"prompt": "What a"},
    {"prompt": "Write a short negative review of a hotel.\n", "user_id": "u2"},
    {"prompt": "The story", "user_id": "u3"},
]
SAMPLING = dict(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=5, seed=0)


class LengthJudge:
    """Longer completions are better (characters)."""

    name = "length"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    return model.eval(), tokenizer


def samples(*scored, finished=None) -> PromptSamples:
    """A prompt's samples from (completion, score) pairs."""
    texts, scores = zip(*scored, strict=True)
    return PromptSamples("p", None, list(texts), list(scores), finished or [True] * len(texts))


# ---------------------------------------------------------------------------------------
# Selection, by hand
# ---------------------------------------------------------------------------------------


def test_selection_rules_on_hand_made_scores():
    prompts = [
        samples(("a", 1.0), ("b", 3.0), ("c", 3.0), ("d", 0.0)),  # pair b > d (first best)
        samples(("a", 2.0), ("b", 2.0), ("c", 2.0)),  # tie
        samples(("a", 0.5), ("b", 0.0)),  # gap exactly min_score_gap: kept
        samples(("a", 0.25), ("b", 0.0)),  # gap below: skipped
        samples(("", 5.0), ("b", 0.0)),  # one completion with text: skipped
        samples((" \n", 9.0), ("a", 1.0), ("b", 2.0)),  # the blank one is no candidate
        samples(("a", 1.0), ("a", 2.0)),  # identical texts (an unsteady judge): a tie
        samples(("a", -1.0), ("b", -3.0), finished=[False, True]),
    ]
    rows, summary = select_pairs(prompts, min_score_gap=0.5)
    picked = [(r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows]
    assert picked == [
        ("b", "d", 3.0, 0.0),
        ("a", "b", 0.5, 0.0),
        ("b", "a", 2.0, 1.0),
        ("a", "b", -1.0, -3.0),
    ]
    assert summary.to_dict() == {
        "prompts": 8,
        "samples_per_prompt": 4,
        "min_score_gap": 0.5,
        "pairs": 4,
        "paired_prompts": 4,
        "skipped_small_gap": 1,
        "skipped_ties": 2,
        "skipped_blank": 1,
        "unfinished_samples": 1,
    }
    assert str(summary) == (
        "4 pairs from 4 of 8 prompts x 4 samples; skipped: 1 gap < 0.5, 2 ties, 1 blank;"
        " 1 samples cut at max_new_tokens"
    )


def test_all_pairs_per_prompt_by_hand():
    prompts = [
        # a=1, b=3, c=3 (a tie with b), d=0: every pair with a gap >= 0.5 and unequal scores
        samples(("a", 1.0), ("b", 3.0), ("c", 3.0), ("d", 0.0)),
        samples(("a", 0.25), ("b", 0.0)),  # gap below: skipped, as best_worst would
        samples(("a", 1.0), ("a", 2.0), ("b", 0.0)),  # identical texts never pair
    ]
    rows, summary = select_pairs(prompts, min_score_gap=0.5, pairs_per_prompt="all")
    picked = [(r["chosen"], r["rejected"]) for r in rows]
    assert picked == [
        ("b", "a"),
        ("c", "a"),
        ("a", "d"),
        ("b", "d"),
        ("c", "d"),
        ("a", "b"),
        ("a", "b"),
    ]
    assert [r["chosen_score"] - r["rejected_score"] for r in rows] == [2, 2, 1, 3, 3, 1, 2]
    assert (summary.pairs, summary.paired_prompts, summary.skipped_small_gap) == (7, 2, 1)
    # best_worst keeps the first of each prompt's (best, worst): a subset of all
    best, _ = select_pairs(prompts, min_score_gap=0.5)
    assert all(
        (r["chosen"], r["rejected"], r["chosen_score"])
        in {(a["chosen"], a["rejected"], a["chosen_score"]) for a in rows}
        for r in best
    )


def test_a_tie_is_skipped_even_with_no_minimum_gap():
    rows, summary = select_pairs([samples(("a", 1.0), ("b", 1.0))], min_score_gap=0.0)
    assert rows == [] and summary.skipped_ties == 1


def test_rows_keep_the_prompt_format_and_the_user_id_as_given():
    chat = [{"role": "user", "content": "Review a phone."}]
    rows, _ = select_pairs(
        [
            PromptSamples(chat, 7, ["good", "bad"], [1.0, 0.0], [True, True]),
            PromptSamples("The", None, [" good", " bad"], [1.0, 0.0], [True, True]),
        ],
        min_score_gap=0.0,
    )
    assert rows == [
        {
            "prompt": chat,
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
            "user_id": 7,
            "chosen_score": 1.0,
            "rejected_score": 0.0,
        },
        {
            "prompt": "The",
            "chosen": " good",
            "rejected": " bad",
            "chosen_score": 1.0,
            "rejected_score": 0.0,
        },
    ]


# ---------------------------------------------------------------------------------------
# Sampling and judging on a tiny model
# ---------------------------------------------------------------------------------------


def test_each_pair_is_the_best_against_the_worst_sample_of_its_prompt(tiny):
    model, tokenizer = tiny
    judge = LengthJudge()
    drawn = sample_completions(model, tokenizer, PROMPTS, judge, **SAMPLING)
    rows, summary = make_pairs(model, tokenizer, PROMPTS, judge, **SAMPLING, min_score_gap=0.0)

    assert [len(s.completions) for s in drawn] == [4] * len(PROMPTS)
    expected = []
    for prompt, s in zip(PROMPTS, drawn, strict=True):
        assert s.scores == [float(len(c)) for c in s.completions]  # what the judge said
        texts = [c for c in s.completions if c.strip()]
        best = max(texts, key=len)
        worst = min(texts, key=len)
        if len(best) > len(worst):
            expected.append((prompt, best, worst))
    assert 0 < len(expected) and summary.pairs == len(expected)
    assert summary.pairs + summary.skipped_ties + summary.skipped_blank == len(PROMPTS)
    for row, (prompt, best, worst) in zip(rows, expected, strict=True):
        assert row["prompt"] == prompt["prompt"]
        assert row["chosen"] == best and row["rejected"] == worst
        assert row["chosen_score"] == len(best) > row["rejected_score"] == len(worst)
        if "user_id" in prompt:
            assert row["user_id"] == prompt["user_id"]  # as given: 7 stays an integer
        else:
            assert "user_id" not in row


def test_pairs_are_deterministic_given_the_seed(tiny):
    model, tokenizer = tiny
    first = make_pairs(model, tokenizer, PROMPTS, LengthJudge(), **SAMPLING, min_score_gap=0.0)
    again = make_pairs(model, tokenizer, PROMPTS, LengthJudge(), **SAMPLING, min_score_gap=0.0)
    other = make_pairs(
        model, tokenizer, PROMPTS, LengthJudge(), **{**SAMPLING, "seed": 1}, min_score_gap=0.0
    )
    assert first == again
    assert first[0] != other[0]


def test_min_score_gap_skips_and_counts_the_close_pairs(tiny):
    model, tokenizer = tiny
    judge = LengthJudge()
    all_pairs, _ = make_pairs(model, tokenizer, PROMPTS, judge, **SAMPLING, min_score_gap=0.0)
    gaps = sorted(r["chosen_score"] - r["rejected_score"] for r in all_pairs)
    threshold = gaps[len(gaps) // 2]
    assert gaps[0] < threshold  # some pairs fall below it, some do not
    rows, summary = make_pairs(
        model, tokenizer, PROMPTS, judge, **SAMPLING, min_score_gap=threshold
    )
    assert summary.skipped_small_gap == sum(g < threshold for g in gaps)
    assert summary.pairs == len(rows) == sum(g >= threshold for g in gaps)
    assert rows == [r for r in all_pairs if r["chosen_score"] - r["rejected_score"] >= threshold]
    assert all(r["chosen_score"] >= r["rejected_score"] + threshold for r in rows)


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_the_written_file_is_dpo_data_with_nothing_dropped(tiny, tmp_path, chat):
    model, tokenizer = tiny
    prompts = [
        {**p, "prompt": [{"role": "user", "content": p["prompt"]}]} if chat else p for p in PROMPTS
    ]
    rows, _ = make_pairs(model, tokenizer, prompts, LengthJudge(), **SAMPLING, min_score_gap=0.0)
    path = write_pairs(tmp_path / "out" / "pairs.jsonl", rows)
    assert [json.loads(line) for line in path.read_text("utf-8").splitlines()] == rows
    assert not list(path.parent.glob(".*.tmp"))

    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=128)
    train, held_out, summary = load_preference_data(cfg, tokenizer, seed=0)
    assert len(train) == len(rows) and held_out == []
    assert summary.total_dropped == 0
    loaded = sorted(str(p.user_id) for p in train)
    assert loaded == sorted(str(r.get("user_id")) for r in rows)


def test_prompt_rows_carry_user_ids_and_bad_rows_name_file_and_line(tmp_path):
    good = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "A", "author": "x"}, {"prompt": [{"role": "user", "content": "B"}]}],
    )
    assert read_prompt_rows(str(good), "author") == [
        {"prompt": "A", "user_id": "x"},
        {"prompt": [{"role": "user", "content": "B"}]},
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "A"}, {"text": "B"}])
    with pytest.raises(DataError, match=rf"{bad}:2: prompts.path: .*'prompt'"):
        read_prompt_rows(str(bad))
    bad_id = write_jsonl(tmp_path / "bad_id.jsonl", [{"prompt": "A", "user_id": [1]}])
    with pytest.raises(DataError, match=rf"{bad_id}:1: prompts.user_id_column"):
        read_prompt_rows(str(bad_id))


# ---------------------------------------------------------------------------------------
# The config and the command
# ---------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            PairsRunConfig,
            None,
            [
                "generation.num_samples=1",
                "generation.temperature=0",
                "selection.min_score_gap=-1",
                "judge.kind=reward_model",
            ],
        )
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == [
        "model.path",
        "prompts.path",
        "generation.num_samples",
        "generation.temperature",
        "judge.path",
        "selection.min_score_gap",
        "output.path",
    ]
    with pytest.raises(ConfigError, match="judge.kind: required"):
        load_config(PairsRunConfig, REPO / "examples" / "pairs_tiny.yaml", ["judge.kind=none"])


def test_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pairs", "--help"])
    out = capsys.readouterr().out
    assert "selection.min_score_gap" in out and "generation.num_samples" in out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """`privdpo sft examples/sft_tiny.yaml`, cut to one step."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    code = run_cli(
        "sft",
        "examples/sft_tiny.yaml",
        f"output.dir={run_dir}",
        "output.progress_bar=false",
        "train.max_steps=1",
    )
    assert code == 0
    return run_dir


def run_cli(*args) -> int:
    cwd = os.getcwd()
    os.chdir(REPO)  # example paths are relative to the repository root
    try:
        return main([*map(str, args)])
    finally:
        os.chdir(cwd)


def test_pairs_command_on_an_sft_run_with_the_example(sft_run, tmp_path, capsys):
    out_file = tmp_path / "pairs.jsonl"
    args = ["pairs", "examples/pairs_tiny.yaml", f"model.path={sft_run}", f"output.path={out_file}"]
    assert run_cli(*args, "generation.max_new_tokens=16") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out_file.read_text("utf-8").splitlines()]
    assert f"from {sft_run / 'model'}, judged by lexicon" in out
    assert f"wrote {len(rows)} pairs to {out_file}" in out

    prompts = {r["prompt"]: r["user_id"] for r in read_prompt_rows("examples/review_prompts.jsonl")}
    assert 0 < len(rows) <= len(prompts)
    for row in rows:
        assert row["user_id"] == prompts[row["prompt"]]
        assert row["chosen_score"] >= row["rejected_score"] + 0.2  # the example's gap
        assert -1 <= row["rejected_score"] < row["chosen_score"] <= 1  # VADER's range
    cfg = DataConfig(train=str(out_file), eval_fraction=0.0, max_length=128)
    _, tokenizer = build_preset("tiny")
    train, _, summary = load_preference_data(cfg, tokenizer, seed=0)
    assert len(train) == len(rows) and summary.total_dropped == 0

    # An existing file is kept unless output.overwrite; the same config gives the same pairs.
    before = out_file.read_bytes()
    assert run_cli(*args, "generation.max_new_tokens=16", "generation.seed=1") == 2
    assert "output.overwrite=true" in capsys.readouterr().err
    assert out_file.read_bytes() == before
    assert run_cli(*args, "generation.max_new_tokens=16", "output.overwrite=true") == 0
    assert out_file.read_bytes() == before


def test_pairs_command_with_a_judge_that_ties_everything_writes_nothing(sft_run, tmp_path, capsys):
    code = run_cli(
        "pairs",
        "examples/pairs_tiny.yaml",
        f"model.path={sft_run}",
        f"output.path={tmp_path / 'pairs.jsonl'}",
        "generation.max_new_tokens=4",
        "generation.num_samples=2",
        "judge.kind=callable",
        "judge.callable=judges_for_tests:constant",
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "skipped: ties            20" in captured.out
    assert "no pairs: all 20 prompts were skipped" in captured.err
    assert not (tmp_path / "pairs.jsonl").exists()


def test_bad_config_keys_exit_2_with_the_closest_key(capsys):
    code = run_cli(
        "pairs", "examples/pairs_tiny.yaml", "selection.min_gap=0.1", "generation.num_sample=3"
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "selection.min_gap: unknown key; did you mean 'selection.min_score_gap'?" in err
    assert "generation.num_sample: unknown key; did you mean 'generation.num_samples'?" in err


def test_a_bad_prompt_row_exits_2_naming_file_and_line(sft_run, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "A"}, {"prompt": ""}])
    code = run_cli(
        "pairs",
        "examples/pairs_tiny.yaml",
        f"model.path={sft_run}",
        f"prompts.path={prompts}",
        f"output.path={tmp_path / 'pairs.jsonl'}",
    )
    assert code == 2
    assert f"{prompts}:2: prompts.path:" in capsys.readouterr().err
