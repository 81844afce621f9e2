"""SFT data: format detection, row validation, tokenization and the train/eval split.

Row formats (`data.format`, or detected from the first readable row):
- `prompt_completion`: `prompt` and `completion`, both text (joined as is) or both lists of
  chat messages (rendered with the tokenizer's chat template);
- `messages`: a chat, a list of `{role, content}`; loss on the assistant turns;
- `text`: plain text; loss on every token.
An optional user id column (`data.user_id_column`) is kept for user-level privacy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from privdpo.config import DataConfig, ScrubConfig
from privdpo.data.loading import convert_rows, load_splits
from privdpo.data.readers import Row, read_rows
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import BadRow, Segment, tokenize_segments, truncate
from privdpo.errors import DataError

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str
    user_id: str | None


def detect_format(rows: list[Row], path: str) -> str | None:
    """The format of the first readable row that has a known set of columns; None when no
    row is readable (each is then reported as a bad row)."""
    readable = [row for row in rows if row.fields is not None]
    for row in readable:
        for name, columns in FORMAT_COLUMNS.items():
            if all(c in row.fields for c in columns):
                return name
    if not readable:
        return None
    raise DataError(
        f"{path}: cannot tell the data format: no row has the columns of a known format"
        f" (first row {readable[0].where} has {sorted(readable[0].fields)}); SFT rows need"
        " prompt+completion, messages, or text (or set data.format)"
    )


def text_field(fields: dict, key: str) -> str:
    if key not in fields or fields[key] is None:
        raise BadRow(
            "missing_field",
            f"missing required field {key!r} (absent or null; in a CSV file an empty, NaN or"
            " NULL cell is a missing value)",
        )
    value = fields[key]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {key!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_field", f"field {key!r} is empty")
    return value


def text_or_chat_fields(fields: dict, keys: tuple[str, ...]) -> list:
    """The values of `keys`, all text or all chats. A list is checked as a chat first, so a
    list that is not one (e.g. of strings) is blamed on its own key, not on a text sibling."""
    values = [fields.get(k) for k in keys]
    lists = [k for k, v in zip(keys, values, strict=True) if isinstance(v, list)]
    if not lists:
        return [text_field(fields, k) for k in keys]
    chats = {k: messages_field(fields.get(k), k) for k in lists}
    others = [k for k in keys if k not in chats]
    if others:
        for k in others:  # a missing or empty value is reported as such
            text_field(fields, k)
        raise BadRow(
            "wrong_type",
            f"{', '.join(repr(k) for k in lists)} {'is a chat' if len(lists) == 1 else 'are chats'}"
            f" (lists of messages) but {', '.join(repr(k) for k in others)} text; give"
            f" {', '.join(repr(k) for k in keys)} all as text or all as lists of"
            " {role, content} messages",
        )
    return [chats[k] for k in keys]


def messages_field(value, key: str) -> list[dict]:
    if value is None:
        raise BadRow("missing_field", f"missing required field {key!r}")
    if not isinstance(value, list) or not value:
        raise BadRow(
            "wrong_type" if value else "empty_field",
            f"field {key!r} must be a non-empty list of {{role, content}} messages",
        )
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRow("bad_message", f"{key}[{i}] must be an object with a text 'role'")
        if not isinstance(m.get("content"), str):
            raise BadRow("bad_message", f"{key}[{i}].content must be text")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def chat_segments(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    loss_on_all: bool,
    train_from: int = 0,
):
    """Segments for a chat: assistant turns from message `train_from` on are trainable, the
    rest (and each turn's header) not. The template is rendered on growing prefixes of the chat, which must each be a text
    prefix of the whole; a template that rewrites earlier turns is an error for the row."""
    if tokenizer.chat_template is None:
        raise DataError(
            "the tokenizer has no chat template, so chat-format rows cannot be rendered; use"
            " a model directory whose tokenizer_config.json has one, or plain-text rows"
        )
    if not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise BadRow("no_assistant_turn", "the chat has no assistant turn to learn from")

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages)
    cuts = []  # (end offset in `full`, trainable)
    for i, m in enumerate(messages):
        learn = m["role"] == "assistant" and i >= train_from
        if learn:
            cuts.append((render(messages[:i], generation_prompt=True), False))
        cuts.append((render(messages[: i + 1]), learn))
    segments, start = [], 0
    for text, trainable in cuts:
        if not full.startswith(text) or len(text) < start:
            raise BadRow(
                "template_not_prefix",
                "the chat template renders this chat's earlier turns differently once later"
                " turns are added, so assistant tokens cannot be located exactly",
            )
        if len(text) > start:
            segments.append(Segment(text[start:], trainable or loss_on_all))
            start = len(text)
    if start < len(full):
        segments.append(Segment(full[start:], loss_on_all))
    return segments


def row_to_example(
    row: Row,
    fmt: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    completion_only_loss: bool,
    summary: DataSummary,
) -> Example:
    f = row.fields
    if fmt == "text":
        segments, templated = [Segment(text_field(f, "text"), True)], False
    elif fmt == "messages":
        messages = messages_field(f.get("messages"), "messages")
        segments, templated = chat_segments(tokenizer, messages, not completion_only_loss), True
    else:
        prompt, completion = text_or_chat_fields(f, ("prompt", "completion"))
        if isinstance(prompt, list):
            segments = chat_segments(tokenizer, prompt + completion, not completion_only_loss)
            templated = True
        else:
            segments = [Segment(prompt, not completion_only_loss), Segment(completion, True)]
            templated = False
    tok = tokenize_segments(
        tokenizer,
        segments,
        templated=templated,
        append_eos=cfg.append_eos and not templated,
        boundary_mismatch=cfg.boundary_mismatch,
        where=row.where,
        summary=summary,
    )
    tok = truncate(tok, cfg.max_length, cfg.truncation, row.where, summary)
    return Example(tok.input_ids, tok.labels, row.where, user_id_of(f, cfg.user_id_column))


def user_id_of(fields: dict, column: str) -> str | None:
    """The row's user id; None when absent, null or blank (a blank id names nobody, and
    must not make one user of every row that lacks an id)."""
    value = fields.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow("wrong_type", f"{column!r} must be text or an integer, got {value!r}")
    return str(value)


def read_examples(
    path: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    completion_only_loss: bool,
    summary: DataSummary,
    rows: Iterable[Row] | None = None,
) -> list[Example]:
    """The examples of `path` (its `rows`, when already read)."""
    rows = list(read_rows(path) if rows is None else rows)
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows, path)
    return convert_rows(
        path,
        rows,
        summary,
        lambda row: row_to_example(row, fmt, cfg, tokenizer, completion_only_loss, summary),
    )


def load_sft_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    completion_only_loss: bool,
    seed: int,
    scrub: ScrubConfig | None = None,
) -> tuple[list[Example], list[Example], DataSummary]:
    def read(path: str, summary: DataSummary, rows: Iterable[Row]) -> list[Example]:
        return read_examples(path, cfg, tokenizer, completion_only_loss, summary, rows)

    return load_splits(cfg, seed, read, "training rows", scrub)


def sample_data_path() -> Path:
    """The small SFT sample that ships with the package (used by the demo)."""
    from importlib import resources

    return Path(str(resources.files("privdpo").joinpath("assets/sample_sft.jsonl")))
