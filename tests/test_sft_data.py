"""Tests for the SFT data pipeline: formats, labels, chat rendering, boundaries, bad rows,
truncation, the eval split, user ids and padding (privdpo.data.sft and friends)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import sft_rows, write_jsonl
from privdpo.config import DataConfig
from privdpo.data.sft import Example, load_sft_data
from privdpo.data.tokenize import IGNORE
from privdpo.errors import DataError

SKIP_HINT = "data.on_bad_row=drop"


def load(tokenizer, train, *, completion_only_loss=True, seed=0, **cfg):
    """load_sft_data on `train` (a path), keeping every row in train unless told."""
    cfg.setdefault("eval_fraction", 0.0)
    return load_sft_data(DataConfig(train=str(train), **cfg), tokenizer, completion_only_loss, seed)


def load_error(tokenizer, train, **cfg) -> str:
    with pytest.raises(DataError) as info:
        load(tokenizer, train, **cfg)
    return str(info.value)


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def labelled_runs(ex: Example) -> list[list[int]]:
    """The contiguous runs of labelled tokens, each as its token ids."""
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != IGNORE:
            assert label == token  # a label is always the token itself
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


# --- every input format gives the same examples ---------------------------------------


def test_every_file_format_gives_identical_examples(tmp_path: Path, tiny_tokenizer) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sft_rows(6)
    paths = [write_jsonl(tmp_path / "d.jsonl", rows)]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    paths.append(tmp_path / "d.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths.append(tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths.append(tmp_path / "d.csv")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    paths.append(tmp_path / "saved")

    results = {}
    for p in paths:
        train, evals, summary = load(tiny_tokenizer, p)
        assert evals == []
        assert summary.kept == {"train": 6, "eval": 0}
        assert summary.dropped == {}
        results[p.name] = [(e.input_ids, e.labels, e.user_id) for e in train]

    reference = results.pop("d.jsonl")
    for name, got in results.items():
        assert got == reference, name
    # and the reference is the plain tokenization, not just equal garbage
    r = rows[0]
    expected = ids(tiny_tokenizer, r["prompt"] + r["completion"]) + [tiny_tokenizer.eos_token_id]
    assert reference[0][0] == expected
    assert [u for _, _, u in reference] == [r["user_id"] for r in rows]


def test_row_locations_follow_the_format(tmp_path: Path, tiny_tokenizer) -> None:
    rows = sft_rows(3)
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    train, _, _ = load(tiny_tokenizer, p)
    assert [e.where for e in train] == [f"{p}:1", f"{p}:2", f"{p}:3"]
    train, _, _ = load(tiny_tokenizer, tmp_path / "d.json")
    assert [e.where for e in train] == [f"{tmp_path / 'd.json'}:{n}" for n in (2, 7, 12)]


# --- plain-text prompt/completion and text ----------------------------------------------


PROMPT, COMPLETION = "Review: the movie was", " good and the music was nice."


def test_prompt_completion_labels_only_the_completion_and_eos(
    tmp_path: Path, tiny_tokenizer
) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}])
    (ex,), _, summary = load(tiny_tokenizer, p)
    prompt_ids = ids(tiny_tokenizer, PROMPT)
    full = ids(tiny_tokenizer, PROMPT + COMPLETION)
    eos = tiny_tokenizer.eos_token_id
    assert full[: len(prompt_ids)] == prompt_ids  # no boundary merge in this row
    assert ex.input_ids == full + [eos]
    completion_ids = full[len(prompt_ids) :]
    assert ex.labels == [IGNORE] * len(prompt_ids) + completion_ids + [eos]
    assert tiny_tokenizer.decode(labelled_runs(ex)[0]) == COMPLETION + "<|endoftext|>"
    assert summary.notes == {}


def test_append_eos_false_adds_no_eos(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}])
    (ex,), _, _ = load(tiny_tokenizer, p, append_eos=False)
    full = ids(tiny_tokenizer, PROMPT + COMPLETION)
    assert ex.input_ids == full
    assert tiny_tokenizer.eos_token_id not in ex.input_ids
    n_prompt = len(ids(tiny_tokenizer, PROMPT))
    assert ex.labels == [IGNORE] * n_prompt + full[n_prompt:]


def test_completion_only_loss_false_labels_every_token(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}])
    (ex,), _, _ = load(tiny_tokenizer, p, completion_only_loss=False)
    assert ex.input_ids == ids(tiny_tokenizer, PROMPT + COMPLETION) + [tiny_tokenizer.eos_token_id]
    assert ex.labels == ex.input_ids


def test_text_format_labels_every_token(tmp_path: Path, tiny_tokenizer) -> None:
    text = "The film was long but the ending was lovely."
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "Short one."}])
    train, _, _ = load(tiny_tokenizer, p)
    assert train[0].input_ids == ids(tiny_tokenizer, text) + [tiny_tokenizer.eos_token_id]
    assert all(e.labels == e.input_ids for e in train)
    train, _, _ = load(tiny_tokenizer, p, append_eos=False)
    assert train[0].input_ids == ids(tiny_tokenizer, text)
    assert train[0].labels == train[0].input_ids


# --- chat -------------------------------------------------------------------------------


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


def render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def test_messages_label_exactly_the_assistant_turns(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,), _, summary = load(tiny_tokenizer, p)
    full = render(tiny_tokenizer, CHAT)
    assert ex.input_ids == ids(tiny_tokenizer, full, special=False)
    assert tiny_tokenizer.decode(ex.input_ids) == full  # ChatML, no EOS appended
    runs = [tiny_tokenizer.decode(run) for run in labelled_runs(ex)]
    assert runs == ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]
    unlabelled = tiny_tokenizer.decode(
        [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label == IGNORE]
    )
    for m in CHAT:
        if m["role"] != "assistant":
            assert m["content"] in unlabelled
    assert unlabelled.endswith("<|im_start|>assistant\n")
    assert summary.notes == {}


def test_messages_without_completion_only_loss_label_everything(
    tmp_path: Path, tiny_tokenizer
) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,), _, _ = load(tiny_tokenizer, p, completion_only_loss=False)
    assert ex.labels == ex.input_ids
    assert ex.input_ids == ids(tiny_tokenizer, render(tiny_tokenizer, CHAT), special=False)


def test_conversational_prompt_completion(tmp_path: Path, tiny_tokenizer) -> None:
    prompt, completion = CHAT[:2], [{"role": "assistant", "content": "Four."}]
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion}])
    (ex,), _, _ = load(tiny_tokenizer, p)
    full = render(tiny_tokenizer, prompt + completion)
    assert ex.input_ids == ids(tiny_tokenizer, full, special=False)
    assert [tiny_tokenizer.decode(r) for r in labelled_runs(ex)] == ["Four.<|im_end|>\n"]


def test_chat_without_assistant_turn_is_a_bad_row(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}, {"messages": CHAT}]
    )
    msg = load_error(tiny_tokenizer, p)
    assert msg.startswith(f"{p}:2: ")
    assert "no assistant turn" in msg and SKIP_HINT in msg
    train, _, summary = load(tiny_tokenizer, p, on_bad_row="drop")
    assert [e.where for e in train] == [f"{p}:1", f"{p}:3"]
    assert summary.to_dict()["dropped"]["no_assistant_turn"]["rows"] == [f"{p}:2"]


# --- the prompt/completion boundary -----------------------------------------------------


MERGING = {"prompt": "The movie was ", "completion": "great"}


def test_merging_boundary_really_changes_tokens(tiny_tokenizer) -> None:
    # the premise of the next tests: the trailing space merges into the completion
    prompt_ids = ids(tiny_tokenizer, MERGING["prompt"])
    joined = ids(tiny_tokenizer, MERGING["prompt"] + MERGING["completion"])
    assert joined[: len(prompt_ids)] != prompt_ids


def test_boundary_split_tokenizes_parts_separately(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl", [MERGING, {"prompt": "The movie was", "completion": " great"}]
    )
    (ex, plain), _, summary = load(tiny_tokenizer, p, boundary_mismatch="split")
    eos = tiny_tokenizer.eos_token_id
    prompt_ids = ids(tiny_tokenizer, MERGING["prompt"])
    completion_ids = ids(tiny_tokenizer, MERGING["completion"], special=False)
    assert ex.input_ids == prompt_ids + completion_ids + [eos]
    assert ex.labels == [IGNORE] * len(prompt_ids) + completion_ids + [eos]
    assert summary.to_dict()["notes"]["boundary_split"]["count"] == 1
    assert summary.to_dict()["notes"]["boundary_split"]["rows"] == [f"{p}:1"]
    # where joining keeps the prompt's tokens, the joined tokenization is used as is
    assert plain.input_ids == ids(tiny_tokenizer, "The movie was great") + [eos]
    n_prompt = len(ids(tiny_tokenizer, "The movie was"))
    assert plain.labels[:n_prompt] == [IGNORE] * n_prompt
    assert plain.labels[n_prompt:] == plain.input_ids[n_prompt:]


def test_boundary_error_names_the_row(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": " there"}, MERGING])
    msg = load_error(tiny_tokenizer, p, boundary_mismatch="error")
    assert msg.startswith(f"{p}:2: ")
    assert "boundary_mismatch=split" in msg


def test_boundary_drop_drops_and_counts(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": " there"}, MERGING])
    train, _, summary = load(tiny_tokenizer, p, boundary_mismatch="drop", on_bad_row="drop")
    assert [e.where for e in train] == [f"{p}:1"]
    dropped = summary.to_dict()["dropped"]
    assert dropped["boundary_mismatch"]["count"] == 1
    assert dropped["boundary_mismatch"]["rows"] == [f"{p}:2"]
    assert "boundary_split" not in summary.notes


def test_boundary_mismatch_error_stops_even_when_dropping(tmp_path: Path, tiny_tokenizer) -> None:
    """`boundary_mismatch=error` stops (config help, tokenize.py docstring), whatever
    `on_bad_row` says."""
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": " there"}, MERGING])
    msg = load_error(tiny_tokenizer, p, boundary_mismatch="error", on_bad_row="drop")
    assert msg.startswith(f"{p}:2: ")


def test_boundary_mismatch_drop_drops_even_when_on_bad_row_is_error(
    tmp_path: Path, tiny_tokenizer
) -> None:
    """`boundary_mismatch=drop` drops the row (config help, tokenize.py docstring), whatever
    `on_bad_row` says."""
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": " there"}, MERGING])
    train, _, summary = load(tiny_tokenizer, p, boundary_mismatch="drop", on_bad_row="error")
    assert [e.where for e in train] == [f"{p}:1"]
    assert summary.dropped["boundary_mismatch"]["rows"] == [f"{p}:2"]


# --- bad rows ---------------------------------------------------------------------------


GOOD = {"prompt": "Hi", "completion": " there"}
LONG_PROMPT = "the movie was " * 20
MAX_LENGTH = 16

# kind -> (raw line, reason, words the error message must contain)
BAD_LINES = {
    "malformed": (b'{"prompt": "Hi" "completion": " x"}', "malformed_json", "malformed JSON"),
    "missing": (b'{"prompt": "Hi", "user_id": "u1"}', "missing_field", "'completion'"),
    "empty": (b'{"prompt": "Hi", "completion": "  "}', "empty_field", "'completion' is empty"),
    "wrong_type": (b'{"prompt": "Hi", "completion": 42}', "wrong_type", "must be text, got int"),
    "not_utf8": (b'{"prompt": "caf\xe9", "completion": " x"}', "not_utf8", "byte 0xe9"),
    "too_long": (
        json.dumps({"prompt": LONG_PROMPT, "completion": " ok"}).encode(),
        "too_long",
        "raise data.max_length",
    ),
}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(i: int) -> bytes:
    return json.dumps({**GOOD, "user_id": f"u{i}"}).encode()


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_row_stops_with_location_and_fix(tmp_path: Path, tiny_tokenizer, kind: str) -> None:
    line, _, words = BAD_LINES[kind]
    p = write_lines(tmp_path / "d.jsonl", [good_line(1), line, good_line(3)])
    msg = load_error(tiny_tokenizer, p, max_length=MAX_LENGTH)
    assert msg.startswith(f"{p}:2: "), msg
    assert words in msg
    if kind == "too_long":
        assert "data.truncation=keep_end" in msg
    assert SKIP_HINT in msg  # every bad row says how to skip it


def test_bad_rows_dropped_counted_and_saved(tmp_path: Path, tiny_tokenizer) -> None:
    lines = [good_line(1)] + [line for line, _, _ in BAD_LINES.values()] + [good_line(8)]
    p = write_lines(tmp_path / "d.jsonl", lines)
    train, evals, summary = load(tiny_tokenizer, p, max_length=MAX_LENGTH, on_bad_row="drop")
    assert [e.where for e in train] == [f"{p}:1", f"{p}:8"]
    assert [e.user_id for e in train] == ["u1", "u8"]
    dropped = summary.to_dict()["dropped"]
    assert {reason: (e["count"], e["rows"]) for reason, e in dropped.items()} == {
        reason: (1, [f"{p}:{n}"]) for n, (_, reason, _) in enumerate(BAD_LINES.values(), 2)
    }
    for _, reason, words in BAD_LINES.values():
        assert words in dropped[reason]["detail"]
    assert summary.total_dropped == len(BAD_LINES)
    assert summary.to_dict()["rows_read"] == {str(p): len(lines)}
    assert summary.kept == {"train": 2, "eval": 0} and evals == []

    # kept rows are exactly what a clean file gives
    clean = write_lines(tmp_path / "clean.jsonl", [good_line(1), good_line(8)])
    expected, _, _ = load(tiny_tokenizer, clean, max_length=MAX_LENGTH)
    assert [(e.input_ids, e.labels) for e in train] == [(e.input_ids, e.labels) for e in expected]

    summary.save(tmp_path / "data_summary.json")
    saved = json.loads((tmp_path / "data_summary.json").read_text("utf-8"))
    assert saved == summary.to_dict()
    assert saved["dropped"]["not_utf8"]["rows"] == [f"{p}:6"]


def test_dropped_too_long_row_is_not_noted_as_truncated(tmp_path: Path, tiny_tokenizer) -> None:
    """Notes are for kept rows that were changed; a dropped row must not show up there."""
    line, _, _ = BAD_LINES["too_long"]
    p = write_lines(tmp_path / "d.jsonl", [good_line(1), line])
    train, _, summary = load(tiny_tokenizer, p, max_length=MAX_LENGTH, on_bad_row="drop")
    assert [e.where for e in train] == [f"{p}:1"]
    assert summary.dropped["too_long"]["rows"] == [f"{p}:2"]
    assert "truncated" not in summary.to_dict()["notes"]


@pytest.mark.parametrize(
    "line",
    [b'{"prompt": "Hi", "completion": ""}', b'{"prompt": "Hi", "completion": oops}'],
    ids=["empty", "malformed"],
)
def test_every_row_bad_means_no_training_rows(tmp_path: Path, tiny_tokenizer, line) -> None:
    p = write_lines(tmp_path / "d.jsonl", [line] * 3)
    msg = load_error(tiny_tokenizer, p, on_bad_row="drop")
    assert str(p) in msg
    assert "no usable training rows" in msg


def test_bad_first_row_is_dropped_not_fatal(tmp_path: Path, tiny_tokenizer) -> None:
    """With on_bad_row=drop a first row missing a field is dropped like any other row; it
    must not stop the run through format detection."""
    p = write_lines(tmp_path / "d.jsonl", [BAD_LINES["missing"][0], good_line(2)])
    train, _, summary = load(tiny_tokenizer, p, on_bad_row="drop")
    assert [e.where for e in train] == [f"{p}:2"]
    assert summary.dropped["missing_field"]["rows"] == [f"{p}:1"]


# --- truncation -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["keep_start", "keep_end"])
def test_truncation_keeps_the_chosen_side(tmp_path: Path, tiny_tokenizer, side: str) -> None:
    row = {"prompt": "Hi", "completion": " the movie was good and the music was lovely too."}
    p = write_jsonl(tmp_path / "d.jsonl", [row, GOOD])
    (full, short), _, summary = load(tiny_tokenizer, p)
    assert summary.notes == {}
    n = 8
    assert len(full.input_ids) > n >= len(short.input_ids)
    (cut, kept), _, summary = load(tiny_tokenizer, p, max_length=n, truncation=side)
    part = slice(0, n) if side == "keep_start" else slice(-n, None)
    assert cut.input_ids == full.input_ids[part]
    assert cut.labels == full.labels[part]
    assert len(cut.input_ids) == n
    assert (kept.input_ids, kept.labels) == (short.input_ids, short.labels)
    notes = summary.to_dict()["notes"]
    assert notes["truncated"]["count"] == 1
    assert notes["truncated"]["rows"] == [f"{p}:1"]


def test_keep_end_rescues_a_long_prompt(tmp_path: Path, tiny_tokenizer) -> None:
    row = {"prompt": LONG_PROMPT, "completion": " ok"}
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,), _, _ = load(tiny_tokenizer, p, max_length=MAX_LENGTH, truncation="keep_end")
    assert len(ex.input_ids) == MAX_LENGTH
    assert ex.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(labelled_runs(ex)[0]) == " ok<|endoftext|>"


# --- eval split -------------------------------------------------------------------------


def test_eval_fraction_split(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", sft_rows(20))
    train, evals, summary = load(tiny_tokenizer, p, eval_fraction=0.25, seed=0)
    assert (len(train), len(evals)) == (15, 5)
    assert summary.kept == {"train": 15, "eval": 5}
    train_at, eval_at = {e.where for e in train}, {e.where for e in evals}
    assert not train_at & eval_at
    assert train_at | eval_at == {f"{p}:{n}" for n in range(1, 21)}

    again, again_evals, _ = load(tiny_tokenizer, p, eval_fraction=0.25, seed=0)
    assert [e.where for e in again] == [e.where for e in train]
    assert [e.where for e in again_evals] == [e.where for e in evals]
    _, other_evals, _ = load(tiny_tokenizer, p, eval_fraction=0.25, seed=1)
    assert {e.where for e in other_evals} != eval_at


def test_explicit_eval_file_is_used_instead_of_splitting(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "train.jsonl", sft_rows(20))
    q = write_jsonl(tmp_path / "eval.jsonl", sft_rows(3))
    train, evals, summary = load(tiny_tokenizer, p, eval=str(q), eval_fraction=0.25)
    assert [e.where for e in train] == [f"{p}:{n}" for n in range(1, 21)]
    assert [e.where for e in evals] == [f"{q}:{n}" for n in range(1, 4)]
    assert summary.kept == {"train": 20, "eval": 3}
    assert summary.rows_read == {str(p): 20, str(q): 3}


# --- user ids ---------------------------------------------------------------------------


def test_user_id_kept_as_text(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "user_id": "alice"}, {**GOOD, "user_id": 7}, GOOD]
    )
    train, _, _ = load(tiny_tokenizer, p)
    assert [e.user_id for e in train] == ["alice", "7", None]

    q = write_jsonl(tmp_path / "e.jsonl", [{**GOOD, "author": 3}, {**GOOD, "user_id": "x"}])
    train, _, _ = load(tiny_tokenizer, q, user_id_column="author")
    assert [e.user_id for e in train] == ["3", None]


def test_user_id_column_absent_gives_none(tmp_path: Path, tiny_tokenizer) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    train, _, _ = load(tiny_tokenizer, p)
    assert [e.user_id for e in train] == [None, None]
