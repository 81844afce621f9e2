"""The loader's blind spots of issue 14, fed as a new user would: each bad file or model
gives one clear error naming file, line and key (exit 2, no traceback), never a silent
change; and `train.shuffle: false` keeps the data's order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from conftest import write_jsonl
from privdpo.cli import main
from privdpo.config import ModelConfig, TrainConfig
from privdpo.errors import UserError
from privdpo.models import load_model_and_tokenizer
from privdpo.training import batch_indices

PAIR = {"prompt": "Review the film:", "chosen": " great fun", "rejected": " dull"}


def dpo_config(tmp_path: Path, train: Path, **sections) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"train": str(train), "eval_fraction": 0.0, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
        "dpo": {"beta": 0.1},
        "output": {"dir": str(tmp_path / "run"), "progress_bar": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def fails(capsys, *argv) -> str:
    """Run the CLI; it must exit 2 with one message and no traceback. Returns stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "Traceback" not in out + err
    return err


def test_chosen_list_of_strings_is_blamed_on_chosen_not_prompt(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR, {**PAIR, "chosen": ["great", "fun"]}])
    err = fails(capsys, "dpo", dpo_config(tmp_path, data))
    assert f"{data}:2:" in err
    assert "chosen[0]" in err and "'prompt'" not in err


def test_chat_chosen_with_text_prompt_names_both_keys(tmp_path, capsys):
    chat = [{"role": "assistant", "content": "great"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{**PAIR, "chosen": chat, "rejected": chat + chat}])
    err = fails(capsys, "dpo", dpo_config(tmp_path, data))
    assert f"{data}:1:" in err and "'chosen', 'rejected' are chats" in err and "'prompt'" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_duplicated_json_key_is_an_error_naming_line_and_key(tmp_path, capsys, suffix):
    good = json.dumps(PAIR)
    bad = good[:-1] + ', "chosen": " awful"}'
    path = tmp_path / f"d{suffix}"
    text = f"{good}\n{bad}\n" if suffix == ".jsonl" else f"[\n{good},\n{bad}\n]\n"
    path.write_text(text, encoding="utf-8")
    err = fails(capsys, "dpo", dpo_config(tmp_path, path))
    line = 2 if suffix == ".jsonl" else 3  # a .json file's first line is its "["
    assert f"{path}:{line}:" in err and "key 'chosen' appears more than once" in err


def test_duplicated_key_rows_are_dropped_and_counted_when_asked(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join([json.dumps(PAIR)] * 3 + [json.dumps(PAIR)[:-1] + ', "prompt": "x"}']),
        encoding="utf-8",
    )
    cfg = dpo_config(tmp_path, path, data={"on_bad_row": "drop"})
    assert main(["dpo", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["dropped"]["duplicate_key"]["rows"] == [f"{path}:4"]


@pytest.mark.parametrize("cell", ["NaN", "nan", "NULL", ""])
def test_csv_missing_value_in_a_text_column_is_not_text(tmp_path, capsys, cell):
    path = tmp_path / "d.csv"
    path.write_text(
        f"prompt,chosen,rejected\nReview:,good,bad\nReview:,{cell},bad\n", encoding="utf-8"
    )
    err = fails(capsys, "dpo", dpo_config(tmp_path, path))
    assert f"{path}:3:" in err and "missing required field 'chosen'" in err


def user_csv(tmp_path: Path) -> Path:
    path = tmp_path / "users.csv"
    lines = ["prompt,chosen,rejected,user_id"]
    lines += [f"Review {i}:,good,bad,u{i % 3}" for i in range(8)]
    lines += ["Review 8:,good,bad,", "Review 9:,good,bad,  "]  # blank ids: lines 10 and 11
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


USER_LEVEL = {"enabled": True, "unit": "user", "contribution_bound": 2, "noise_multiplier": 1.0}


def test_blank_user_id_under_user_level_privacy_is_an_error(tmp_path, capsys):
    data = user_csv(tmp_path)
    cfg = dpo_config(tmp_path, data, privacy=USER_LEVEL)
    err = fails(capsys, "privacy", "plan", cfg)
    assert f"{data}:10:" in err and "'user_id'" in err and f"{data}:11" in err
    assert "data.missing_user_id=own_user" in err
    err = fails(capsys, "dpo", cfg)  # the training run refuses the same way
    assert f"{data}:10:" in err
    assert not (tmp_path / "run").exists()


def test_a_jsonl_row_with_no_user_id_key_under_user_level_privacy_is_an_error(tmp_path, capsys):
    rows = [{**PAIR, "user_id": f"u{i % 2}"} for i in range(4)] + [PAIR]  # line 5: no key
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = dpo_config(tmp_path, data, privacy=USER_LEVEL)
    err = fails(capsys, "dpo", cfg)
    assert f"{data}:5:" in err and "'user_id'" in err and f"{data}:4" not in err
    assert "data.missing_user_id=own_user" in err
    assert not (tmp_path / "run").exists()


def test_blank_user_ids_are_users_of_their_own_only_when_asked(tmp_path, capsys):
    data = user_csv(tmp_path)
    cfg = dpo_config(tmp_path, data, privacy=USER_LEVEL, data={"missing_user_id": "own_user"})
    assert main(["privacy", "plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "users" in out
    # 3 real users and 2 rows of their own: 5 users, not 4 (u0, u1, u2 and one "").
    from privdpo.config import DPORunConfig, load_config
    from privdpo.data.preference import load_preference_data
    from privdpo.models import build_tiny_tokenizer

    run = load_config(DPORunConfig, cfg, [])
    train, _, summary = load_preference_data(run.data, build_tiny_tokenizer(512), 0)
    assert len({p.user_id for p in train}) == 5
    assert summary.notes["own_user"]["count"] == 2


def test_every_row_dropped_puts_the_summary_in_the_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a"}] * 3)
    err = fails(capsys, "dpo", dpo_config(tmp_path, data, data={"on_bad_row": "drop"}))
    assert "no usable preference pairs left (3 dropped)" in err
    assert "dropped       3  missing_field" in err and f"{data}:1" in err
    assert "see the data summary above" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / "missing.yaml",
        lambda d: d,  # a directory
        lambda d: (d / "bad.yaml").write_text("model: [unclosed\n") and d / "bad.yaml",
        lambda d: (d / "list.yaml").write_text("- a\n- b\n") and d / "list.yaml",
        lambda d: (d / "bin.yaml").write_bytes(b"\xff\xfe\x00") and d / "bin.yaml",
    ],
    ids=["missing", "directory", "bad-yaml", "not-a-mapping", "not-utf8"],
)
def test_privacy_plan_with_bad_arguments_prints_no_traceback(tmp_path, capsys, make):
    err = fails(capsys, "privacy", "plan", make(tmp_path))
    assert "config file" in err


def test_privacy_plan_with_a_bad_override_prints_no_traceback(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 4)
    err = fails(capsys, "privacy", "plan", dpo_config(tmp_path, data), "privacy.enabled=maybe")
    assert "privacy.enabled" in err


# ---- tokenizers ------------------------------------------------------------------------
WORDS = {"[UNK]": 0, "<eos>": 1, "the": 2, "quick": 3, "brown": 4, "fox": 5, "film": 6, "was": 7}


def save_model(directory: Path, vocab_size: int) -> Path:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def save_word_level(directory: Path, vocab: dict = WORDS, unk: str | None = "[UNK]") -> None:
    if unk is None:  # BPE with no merges and no unk token: unknown text encodes to nothing
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    else:
        backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(directory)


def test_a_saved_word_level_tokenizer_loads_as_saved(tmp_path):
    directory = save_model(tmp_path / "m", len(WORDS))
    save_word_level(directory)
    _, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(directory)))
    # AutoTokenizer rebuilt it as a Qwen2 tokenizer: no ids at all, and one past the vocab.
    assert tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"] == [2, 3, 4, 5]
    assert len(tokenizer) == len(WORDS)


def test_tokenizer_ids_beyond_the_embedding_are_refused(tmp_path, capsys):
    directory = save_model(tmp_path / "m", 4)
    save_word_level(directory)
    expected = (
        f"model.path: the tokenizer in {directory} has ids up to 7, but the embedding of the"
        f" model in {directory} has 4 rows"
    )
    with pytest.raises(UserError, match=re.escape(expected)):
        load_model_and_tokenizer(ModelConfig(path=str(directory)))
    # The same through the CLI: exit 2, one message naming the key and the directory.
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 2)
    cfg = dpo_config(tmp_path, data, model={"preset": None, "path": str(directory)})
    assert expected in fails(capsys, "dpo", cfg)
    assert not (tmp_path / "run").exists()


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path, capsys):
    directory = save_model(tmp_path / "m", 8)
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 2)
    cfg = dpo_config(tmp_path, data, model={"preset": None, "path": str(directory)})
    err = fails(capsys, "dpo", cfg)
    assert "has no tokenizer files" in err and "tokenizer.json" in err
    assert "model.tokenizer_path" in err


def test_a_tokenizer_given_by_path_is_used(tmp_path):
    directory = save_model(tmp_path / "m", len(WORDS))
    save_word_level(tmp_path / "tok")
    cfg = ModelConfig(path=str(directory), tokenizer_path=str(tmp_path / "tok"))
    _, tokenizer = load_model_and_tokenizer(cfg)
    assert tokenizer("the fox", add_special_tokens=False)["input_ids"] == [2, 5]


def test_a_tokenizer_that_encodes_text_to_nothing_is_refused(tmp_path, capsys):
    directory = save_model(tmp_path / "m", 3)
    save_word_level(directory, {"[UNK]": 0, "<eos>": 1, "zz": 2}, unk=None)
    with pytest.raises(UserError, match="encodes the text .* to no tokens"):
        load_model_and_tokenizer(ModelConfig(path=str(directory)))
    # The same through the CLI: exit 2, one message naming the key and the directory.
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 2)
    cfg = dpo_config(tmp_path, data, model={"preset": None, "path": str(directory)})
    err = fails(capsys, "dpo", cfg)
    assert f"model.path: the tokenizer in {directory} encodes the text" in err
    assert "to no tokens" in err
    assert not (tmp_path / "run").exists()


def test_a_prompt_the_tokenizer_cannot_encode_is_a_bad_row(tmp_path, capsys):
    vocab = {**{c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,:")}, "<eos>": 30}
    directory = save_model(tmp_path / "m", len(vocab))
    save_word_level(directory, vocab, unk=None)
    # BPE over single characters: Latin text encodes, Hangul has no token at all.
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR, {**PAIR, "prompt": "영화 평"}])
    cfg = dpo_config(tmp_path, data, model={"preset": None, "path": str(directory)})
    err = fails(capsys, "dpo", cfg)
    assert f"{data}:2:" in err and "encodes the prompt text" in err


# ---- data order ------------------------------------------------------------------------
def test_shuffle_false_keeps_the_order_of_the_data():
    cfg = TrainConfig(shuffle=False, batch_size=3)
    assert [batch_indices(s, 7, cfg) for s in range(4)] == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]
    shuffled = [batch_indices(s, 7, TrainConfig(batch_size=3)) for s in range(3)]
    assert sorted(i for b in shuffled for i in b) == list(range(7))
    assert shuffled != [[0, 1, 2], [3, 4, 5], [6]]


def test_shuffle_false_is_refused_with_privacy(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 4)
    cfg = dpo_config(tmp_path, data, privacy={"enabled": True, "noise_multiplier": 1.0})
    err = fails(capsys, "dpo", cfg, "train.shuffle=false")
    assert "train.shuffle: false fixes the order, but DP-SGD samples" in err
