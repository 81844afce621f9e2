"""Tests for the DPO preference data pipeline: text and chat rows, implicit prompts,
identical pairs, truncation, bad rows, user ids, the eval split, the pair batch and the
prompt/response token boundary (privdpo.data.preference and privdpo.data.batching)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from privdpo.config import DataConfig
from privdpo.data.preference import (
    PairExample,
    load_preference_data,
    read_pairs,
    row_to_pair,
    split_implicit_prompt,
    truncate_pair,
)
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import BadRow
from privdpo.errors import DataError

PROMPT = "Question: what is two plus two? Answer:"
CHOSEN = " four"
REJECTED = " five, or maybe six"


def load(tokenizer, train, *, seed=0, **cfg):
    """load_preference_data on `train` (a path), keeping every pair in train unless told."""
    cfg.setdefault("eval_fraction", 0.0)
    return load_preference_data(DataConfig(train=str(train), **cfg), tokenizer, seed)


def load_error(tokenizer, train, **cfg) -> str:
    with pytest.raises(DataError) as info:
        load(tokenizer, train, **cfg)
    return str(info.value)


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def pair_rows(n: int) -> list[dict]:
    words = ["good", "bad", "great", "awful", "fine", "nice", "poor", "lovely"]
    return [
        {
            "prompt": f"Review {i}: the movie was",
            "chosen": f" {words[i % 8]} and fun.",
            "rejected": f" {words[(i + 3) % 8]}.",
            "user_id": f"u{i % 3}",
        }
        for i in range(n)
    ]


# --- text rows ------------------------------------------------------------------------


def test_text_row_tokenizes_prompt_once_and_responses_as_continuations(
    tmp_path: Path, tiny_tokenizer
) -> None:
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    )
    train, evals, summary = load(tok, path)
    assert evals == []
    assert summary.kept == {"train": 1, "eval": 0}
    assert summary.dropped == {}
    (pair,) = train

    prompt_ids = ids(tok, PROMPT)
    full_c, full_r = ids(tok, PROMPT + CHOSEN), ids(tok, PROMPT + REJECTED)
    # Preconditions of this example: no BPE merge across the boundary.
    assert full_c[: len(prompt_ids)] == prompt_ids
    assert full_r[: len(prompt_ids)] == prompt_ids

    assert pair.prompt_ids == prompt_ids
    assert pair.chosen_ids == full_c[len(prompt_ids) :] + [eos]
    assert pair.rejected_ids == full_r[len(prompt_ids) :] + [eos]
    assert pair.chosen_ids != pair.rejected_ids
    assert pair.where == f"{path}:1"
    assert pair.user_id is None
    assert "boundary_split" not in summary.notes
    assert "truncated" not in summary.notes


def test_text_row_without_eos_when_append_eos_is_off(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    )
    (pair,), _, _ = load(tok, path, append_eos=False)
    n = len(ids(tok, PROMPT))
    assert pair.prompt_ids == ids(tok, PROMPT)
    assert pair.chosen_ids == ids(tok, PROMPT + CHOSEN)[n:]
    assert pair.rejected_ids == ids(tok, PROMPT + REJECTED)[n:]
    assert tok.eos_token_id not in pair.chosen_ids + pair.rejected_ids


def test_many_text_rows_keep_order_and_locations(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    rows = pair_rows(5)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, _, summary = load(tok, path)
    assert summary.rows_read == {str(path): 5}
    assert [p.where for p in train] == [f"{path}:{i}" for i in range(1, 6)]
    for row, pair in zip(rows, train, strict=True):
        assert pair.prompt_ids == ids(tok, row["prompt"])
        seq_c = pair.prompt_ids + pair.chosen_ids
        seq_r = pair.prompt_ids + pair.rejected_ids
        assert seq_c == ids(tok, row["prompt"] + row["chosen"]) + [tok.eos_token_id]
        assert seq_r == ids(tok, row["prompt"] + row["rejected"]) + [tok.eos_token_id]


# --- chat rows ------------------------------------------------------------------------

CHAT_PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_row_prompt_is_the_whole_history_and_responses_end_their_turn(
    tmp_path: Path, tiny_tokenizer
) -> None:
    tok = tiny_tokenizer
    chosen = [{"role": "assistant", "content": "Paris."}]
    rejected = [{"role": "assistant", "content": "London, I think."}]
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"prompt": CHAT_PROMPT, "chosen": chosen, "rejected": rejected}]
    )
    (pair,), _, summary = load(tok, path)
    assert summary.dropped == {}

    prompt_text = tok.decode(pair.prompt_ids)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert "Hello, how can I help?" in prompt_text  # the earlier turn is prompt
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt_text
    assert tok.decode(pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "London, I think.<|im_end|>\n"
    # No EOS appended after the template's own end of turn.
    assert pair.chosen_ids[-1] != tok.eos_token_id

    # Independently: the rendered prompt with a generation header, then the whole chat.
    rendered_prompt = tok.apply_chat_template(
        CHAT_PROMPT, tokenize=False, add_generation_prompt=True
    )
    assert pair.prompt_ids == ids(tok, rendered_prompt, special=False)
    full = tok.apply_chat_template(CHAT_PROMPT + chosen, tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids == ids(tok, full, special=False)


# --- implicit prompts -----------------------------------------------------------------


def test_split_implicit_prompt_text_moves_the_space_into_the_responses() -> None:
    assert split_implicit_prompt("The movie was great fun.", "The movie was grim.") == (
        "The movie was",
        " great fun.",
        " grim.",
    )


def test_split_implicit_prompt_chat_splits_at_the_message_list() -> None:
    user = {"role": "user", "content": "Name a colour."}
    a = {"role": "assistant", "content": "Blue."}
    b = {"role": "assistant", "content": "Bread."}
    assert split_implicit_prompt([user, a], [user, b]) == ([user], [a], [b])


def test_implicit_text_prompt_through_read_pairs(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [{"chosen": "The movie was great fun.", "rejected": "The movie was grim."}],
    )
    summary = DataSummary("error")
    (pair,) = read_pairs(str(path), DataConfig(train=str(path)), tok, summary)
    n = len(ids(tok, "The movie was"))
    assert pair.prompt_ids == ids(tok, "The movie was")
    assert pair.chosen_ids == ids(tok, "The movie was great fun.")[n:] + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, "The movie was grim.")[n:] + [tok.eos_token_id]
    assert tok.decode(pair.chosen_ids) == " great fun.<|endoftext|>"
    assert tok.decode(pair.rejected_ids) == " grim.<|endoftext|>"


def test_implicit_chat_prompt_is_the_shared_first_messages(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    user = {"role": "user", "content": "Name a colour."}
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Blue."}],
                "rejected": [user, {"role": "assistant", "content": "Bread."}],
            }
        ],
    )
    (pair,), _, summary = load(tok, path)
    assert summary.dropped == {}
    expected_prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == ids(tok, expected_prompt, special=False)
    assert tok.decode(pair.chosen_ids) == "Blue.<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "Bread.<|im_end|>\n"


@pytest.mark.parametrize(
    "row",
    [
        {"chosen": "Sunny days.", "rejected": "Rain all week."},
        {
            "chosen": [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
            ],
            "rejected": [
                {"role": "user", "content": "Hey."},
                {"role": "assistant", "content": "Go away."},
            ],
        },
    ],
    ids=["text", "chat"],
)
def test_rows_sharing_no_prompt_are_bad_rows(tmp_path: Path, tiny_tokenizer, row) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [row, *pair_rows(1)])
    msg = load_error(tiny_tokenizer, path)
    assert msg.startswith(f"{path}:1:")
    assert "'prompt'" in msg
    train, _, summary = load(tiny_tokenizer, path, on_bad_row="drop")
    assert len(train) == 1
    assert summary.dropped["no_prompt"]["count"] == 1
    assert summary.dropped["no_prompt"]["rows"] == [f"{path}:1"]


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        ("The movie was", "The movie was grim."),  # chosen is a prefix of rejected
        ("The movie was grim.", "The movie was"),  # rejected is a prefix of chosen
        ("abc", "abcdef"),
    ],
    ids=["chosen_prefix", "rejected_prefix", "no_space"],
)
def test_one_response_a_prefix_of_the_other_is_a_bad_row(
    tmp_path: Path, tiny_tokenizer, chosen, rejected
) -> None:
    """The whole of one response is the shared prefix, so its reply would be empty: the
    row is unusable whichever of the two is the shorter one (and must not crash)."""
    path = write_jsonl(
        tmp_path / "x.jsonl", [{"chosen": chosen, "rejected": rejected}, *pair_rows(1)]
    )
    train, _, summary = load(tiny_tokenizer, path, on_bad_row="drop")
    assert len(train) == 1, [tiny_tokenizer.decode(p.prompt_ids) for p in train]
    assert summary.total_dropped == 1
    (entry,) = summary.dropped.values()
    assert entry["rows"] == [f"{path}:1"]
    assert load_error(tiny_tokenizer, path).startswith(f"{path}:1:")


# --- identical pairs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN},
        {"chosen": "Same words here.", "rejected": "Same words here."},
        {
            "prompt": CHAT_PROMPT,
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Paris."}],
        },
    ],
    ids=["text", "implicit", "chat"],
)
def test_identical_pairs_are_dropped_by_default_even_in_error_mode(
    tmp_path: Path, tiny_tokenizer, row
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*pair_rows(2), row])
    train, _, summary = load(tiny_tokenizer, path, on_bad_row="error")
    assert len(train) == 2
    assert summary.dropped["identical_pair"]["count"] == 1
    assert summary.dropped["identical_pair"]["rows"] == [f"{path}:3"]
    assert summary.total_dropped == 1


def test_identical_pairs_error_setting_stops_even_in_drop_mode(
    tmp_path: Path, tiny_tokenizer
) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [*pair_rows(1), {"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}],
    )
    msg = load_error(tiny_tokenizer, path, identical_pairs="error", on_bad_row="drop")
    assert msg.startswith(f"{path}:2:")
    assert "identical" in msg


# --- truncation -----------------------------------------------------------------------


def make_pair(n_prompt: int, n_chosen: int, n_rejected: int) -> PairExample:
    return PairExample(
        list(range(100, 100 + n_prompt)),
        list(range(200, 200 + n_chosen)),
        list(range(300, 300 + n_rejected)),
        "f.jsonl:7",
        None,
    )


def test_truncate_pair_max_prompt_length_keeps_the_prompt_end() -> None:
    pair = make_pair(10, 3, 2)
    summary = DataSummary("error")
    out = truncate_pair(pair, DataConfig(max_length=64, max_prompt_length=4), summary)
    assert out.prompt_ids == [106, 107, 108, 109]
    assert out.chosen_ids == pair.chosen_ids
    assert out.rejected_ids == pair.rejected_ids
    assert summary.notes["truncated"]["rows"] == ["f.jsonl:7"]


def test_truncate_pair_keep_start_cuts_response_ends() -> None:
    pair = make_pair(4, 8, 5)
    summary = DataSummary("error")
    out = truncate_pair(pair, DataConfig(max_length=10, truncation="keep_start"), summary)
    assert out.prompt_ids == pair.prompt_ids
    assert out.chosen_ids == list(range(200, 206))
    assert out.rejected_ids == pair.rejected_ids  # 4 + 5 fits
    assert len(out.prompt_ids + out.chosen_ids) == 10
    assert summary.notes["truncated"]["count"] == 1


def test_truncate_pair_keep_end_cuts_the_prompt_start_first() -> None:
    pair = make_pair(8, 5, 3)
    summary = DataSummary("error")
    out = truncate_pair(pair, DataConfig(max_length=9, truncation="keep_end"), summary)
    assert out.prompt_ids == [104, 105, 106, 107]
    assert out.chosen_ids == pair.chosen_ids
    assert out.rejected_ids == pair.rejected_ids
    assert summary.notes["truncated"]["count"] == 1


def test_truncate_pair_that_fits_is_unchanged_and_not_noted() -> None:
    pair = make_pair(4, 3, 2)
    summary = DataSummary("error")
    out = truncate_pair(pair, DataConfig(max_length=7), summary)
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == (
        pair.prompt_ids,
        pair.chosen_ids,
        pair.rejected_ids,
    )
    assert summary.notes == {}


@pytest.mark.parametrize(
    ("truncation", "sizes", "what"),
    [
        ("keep_start", (10, 3, 3), "a response"),  # the prompt fills max_length
        ("keep_end", (3, 10, 2), "the prompt"),  # a response alone fills it
    ],
)
def test_truncate_pair_leaving_nothing_is_too_long(truncation, sizes, what) -> None:
    with pytest.raises(BadRow) as info:
        truncate_pair(
            make_pair(*sizes), DataConfig(max_length=10, truncation=truncation), DataSummary("drop")
        )
    assert info.value.reason == "too_long"
    assert str(info.value).startswith(what)
    assert "data.max_length=10" in str(info.value)


def test_truncation_through_the_loader(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    long_response = " and the music was lovely and the story was good and fun."
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": PROMPT, "chosen": long_response, "rejected": CHOSEN}]
    )
    n_prompt = len(ids(tok, PROMPT))
    full_c = ids(tok, PROMPT + long_response) + [tok.eos_token_id]
    max_length = n_prompt + 4
    assert len(full_c) > max_length  # precondition
    (pair,), _, summary = load(tok, path, max_length=max_length)
    assert pair.prompt_ids == ids(tok, PROMPT)
    assert pair.chosen_ids == full_c[n_prompt:max_length]
    assert summary.notes["truncated"]["rows"] == [f"{path}:1"]

    (pair,), _, _ = load(tok, path, max_length=64, max_prompt_length=3)
    assert pair.prompt_ids == ids(tok, PROMPT)[-3:]


def test_too_long_pair_stops_with_location_or_is_counted(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    short = {"prompt": "Hi there.", "chosen": " Yes.", "rejected": " No."}
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [short, {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}],
    )
    max_length = len(ids(tok, PROMPT))  # the prompt alone fills it
    assert len(ids(tok, short["prompt"] + short["chosen"])) + 1 <= max_length  # precondition
    msg = load_error(tok, path, max_length=max_length)
    assert msg.startswith(f"{path}:2:")
    assert "raise data.max_length" in msg
    assert "data.on_bad_row=drop" in msg
    train, _, summary = load(tok, path, max_length=max_length, on_bad_row="drop")
    assert len(train) == 1
    assert summary.dropped["too_long"]["rows"] == [f"{path}:2"]


# --- bad rows -------------------------------------------------------------------------

BAD_ROWS = {
    "missing_chosen": ({"prompt": PROMPT, "rejected": REJECTED}, "missing_field"),
    "missing_rejected": ({"prompt": PROMPT, "chosen": CHOSEN}, "missing_field"),
    "implicit_missing_rejected": ({"chosen": "The movie was fun."}, "missing_field"),
    "chosen_number": ({"prompt": PROMPT, "chosen": 4, "rejected": REJECTED}, "wrong_type"),
    "implicit_number": ({"chosen": 4, "rejected": "The movie was fun."}, "wrong_type"),
    "empty_chosen": ({"prompt": PROMPT, "chosen": "", "rejected": REJECTED}, "empty_field"),
    "empty_prompt": ({"prompt": "  ", "chosen": CHOSEN, "rejected": REJECTED}, "empty_field"),
    "chat_missing_chosen": (
        {"prompt": CHAT_PROMPT, "rejected": [{"role": "assistant", "content": "No."}]},
        "missing_field",
    ),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_stops_with_location_or_is_counted(tmp_path: Path, tiny_tokenizer, name) -> None:
    bad, reason = BAD_ROWS[name]
    rows = pair_rows(3)
    rows.insert(1, bad)
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    msg = load_error(tiny_tokenizer, path)
    assert msg.startswith(f"{path}:2:")
    assert "data.on_bad_row=drop" in msg
    train, _, summary = load(tiny_tokenizer, path, on_bad_row="drop")
    assert len(train) == 3
    assert summary.dropped[reason]["count"] == 1
    assert summary.dropped[reason]["rows"] == [f"{path}:2"]
    assert summary.total_dropped == 1
    assert [p.where for p in train] == [f"{path}:{i}" for i in (1, 3, 4)]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": PROMPT, "chosen": "", "rejected": ""}, "empty_field"),
        ({"prompt": PROMPT, "chosen": 4, "rejected": 4}, "wrong_type"),
        ({"chosen": "", "rejected": ""}, "empty_field"),
        ({"chosen": 4, "rejected": 4}, "wrong_type"),
    ],
    ids=["empty", "number", "implicit_empty", "implicit_number"],
)
def test_invalid_responses_are_bad_rows_even_when_equal(
    tmp_path: Path, tiny_tokenizer, row, reason
) -> None:
    """Validation comes before the identical-pair check: an invalid row must not slip
    through as a silently dropped identical pair when data.on_bad_row=error."""
    path = write_jsonl(tmp_path / "v.jsonl", [*pair_rows(1), row])
    msg = load_error(tiny_tokenizer, path)
    assert msg.startswith(f"{path}:2:")
    _, _, summary = load(tiny_tokenizer, path, on_bad_row="drop")
    assert list(summary.dropped) == [reason]


def test_malformed_json_line_stops_with_location_or_is_counted(
    tmp_path: Path, tiny_tokenizer
) -> None:
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(r) for r in pair_rows(2)]
    lines.insert(1, '{"prompt": "x", "chosen": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    msg = load_error(tiny_tokenizer, path)
    assert msg.startswith(f"{path}:2:")
    assert "malformed JSON" in msg
    train, _, summary = load(tiny_tokenizer, path, on_bad_row="drop")
    assert len(train) == 2
    assert summary.dropped["malformed_json"]["rows"] == [f"{path}:2"]
    assert summary.rows_read == {str(path): 3}


def test_file_without_chosen_or_rejected_is_a_data_error(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi", "completion": " there"}] * 2)
    for mode in ("error", "drop"):
        msg = load_error(tiny_tokenizer, path, on_bad_row=mode)
        assert msg.startswith(f"{path}:1:")
        assert "'chosen'" in msg and "'rejected'" in msg
        assert "completion" in msg


def test_no_usable_pairs_left_is_a_data_error(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "e.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}] * 2
    )
    msg = load_error(tiny_tokenizer, path)
    assert "no usable preference pairs" in msg
    assert "2 dropped" in msg


def test_row_to_pair_raises_bad_row_with_reason(tiny_tokenizer) -> None:
    cfg = DataConfig()
    with pytest.raises(BadRow) as info:
        row_to_pair(
            {"prompt": PROMPT, "chosen": [1], "rejected": REJECTED},
            "f:1",
            cfg,
            tiny_tokenizer,
            DataSummary("error"),
        )
    assert info.value.reason in {"wrong_type", "bad_message"}
    pair = row_to_pair(
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "user_id": 7},
        "f:2",
        cfg,
        tiny_tokenizer,
        DataSummary("error"),
    )
    assert pair.where == "f:2"
    assert pair.user_id == "7"
    assert pair.prompt_ids == ids(tiny_tokenizer, PROMPT)


# --- user ids and the eval split ------------------------------------------------------


def test_user_id_is_kept_as_text(tmp_path: Path, tiny_tokenizer) -> None:
    rows = pair_rows(3)
    rows[0]["user_id"] = 42
    del rows[2]["user_id"]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    train, _, _ = load(tiny_tokenizer, path)
    assert [p.user_id for p in train] == ["42", "u1", None]

    path = write_jsonl(tmp_path / "w.jsonl", [{**r, "author": f"a{i}"} for i, r in enumerate(rows)])
    train, _, _ = load(tiny_tokenizer, path, user_id_column="author")
    assert [p.user_id for p in train] == ["a0", "a1", "a2"]


def test_eval_fraction_holds_out_pairs_deterministically(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows(10))
    train, evals, summary = load(tiny_tokenizer, path, eval_fraction=0.2, seed=3)
    assert (len(train), len(evals)) == (8, 2)
    assert summary.kept == {"train": 8, "eval": 2}
    wheres = [p.where for p in train + evals]
    assert sorted(wheres) == sorted(f"{path}:{i}" for i in range(1, 11))
    train2, evals2, _ = load(tiny_tokenizer, path, eval_fraction=0.2, seed=3)
    assert [p.where for p in evals2] == [p.where for p in evals]
    assert [p.where for p in train2] == [p.where for p in train]


def test_explicit_eval_file(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    train_path = write_jsonl(tmp_path / "train.jsonl", pair_rows(4))
    eval_rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    train, evals, summary = load(tok, train_path, eval=str(eval_path), eval_fraction=0.5)
    assert len(train) == 4  # eval_fraction is ignored with an eval file
    assert [p.where for p in evals] == [f"{eval_path}:1"]
    assert evals[0].prompt_ids == ids(tok, PROMPT)
    assert summary.kept == {"train": 4, "eval": 1}
    assert summary.rows_read == {str(train_path): 4, str(eval_path): 1}


# --- the prompt/response boundary -----------------------------------------------------


def test_prompt_ending_in_a_space_is_split_at_the_boundary(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    prompt = "The film was "
    # Precondition: joining merges the space into the response, changing the prompt tokens.
    joined = ids(tok, prompt + "great")
    assert joined[: len(ids(tok, prompt))] != ids(tok, prompt)
    path = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": prompt, "chosen": "great", "rejected": "awful"}]
    )
    (pair,), _, summary = load(tok, path, boundary_mismatch="split")
    assert pair.prompt_ids == ids(tok, prompt)
    assert pair.chosen_ids == ids(tok, "great", special=False) + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, "awful", special=False) + [tok.eos_token_id]
    assert summary.notes["boundary_split"]["rows"][0] == f"{path}:1"

    msg = load_error(tok, path, boundary_mismatch="error", on_bad_row="drop")
    assert msg.startswith(f"{path}:1:")
    assert "data.boundary_mismatch=split" in msg
