"""Preference data for DPO: validation, implicit prompts, tokenization and truncation.

Rows: `prompt`, `chosen`, `rejected` as text, or as chat messages (the prompt a list of
messages, chosen and rejected lists of the assistant's reply); or only `chosen` and
`rejected`, sharing a prefix that is the implicit prompt. The prompt is tokenized once and
each response as its continuation, with the same boundary rule as SFT (see
`data/tokenize.py`). An optional user id column is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from privdpo.config import DataConfig, ScrubConfig
from privdpo.data.loading import convert_rows, load_splits
from privdpo.data.readers import Row, read_rows
from privdpo.data.sft import chat_segments, text_or_chat_fields, user_id_of
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import IGNORE, BadRow, Segment, tokenize_segments
from privdpo.errors import DataError


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the chosen response's tokens, after the prompt
    rejected_ids: list[int]
    where: str
    user_id: str | None


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from two responses that share their beginning.

    Chats: the longest common prefix of the two message lists. Text: the longest common
    prefix, moved back to just before a whitespace character so each response starts with
    its separating space, as a BPE tokenizer would split the joined text.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise BadRow("wrong_type", "chosen and rejected must both be text or both be chats")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == min(len(chosen), len(rejected)):
        raise BadRow(
            "empty_field",
            "one response is the beginning of the other, so it has no text of its own after"
            " the shared prompt; add a 'prompt' column",
        )
    while n > 0 and not chosen[n - 1 : n].isspace() and not chosen[n : n + 1].isspace():
        n -= 1
    if n > 0 and chosen[n - 1].isspace():
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _response_tokens(
    tokenizer, prompt, response, cfg: DataConfig, where: str, summary: DataSummary
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for one response continuing the prompt."""
    if isinstance(prompt, list):
        segments = chat_segments(tokenizer, prompt + response, False, train_from=len(prompt))
        templated = True
    else:
        segments = [Segment(prompt, False), Segment(response, True)]
        templated = False
    tok = tokenize_segments(
        tokenizer,
        segments,
        templated=templated,
        append_eos=cfg.append_eos and not templated,
        boundary_mismatch=cfg.boundary_mismatch,
        where=where,
        summary=summary,
    )
    start = next((i for i, label in enumerate(tok.labels) if label != IGNORE), len(tok.labels))
    return tok.input_ids[:start], tok.input_ids[start:]


def truncate_pair(pair: PairExample, cfg: DataConfig, summary: DataSummary) -> PairExample:
    """Fit prompt + each response into `max_length` (the prompt first to its own cap).

    The prompt cap keeps the prompt's end (nearest the response). Then `keep_start` cuts
    the ends of the responses; `keep_end` cuts the prompt's start first and a response's
    start only if it alone is too long. A response left empty makes the pair unusable.
    """
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    changed = False
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        prompt, changed = prompt[-cfg.max_prompt_length :], True
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > cfg.max_length:
        changed = True
        if cfg.truncation == "keep_start":
            room = max(0, cfg.max_length - len(prompt))
            chosen, rejected = chosen[:room], rejected[:room]
        else:
            keep = max(0, cfg.max_length - longest)
            prompt = prompt[len(prompt) - keep :] if keep else []
            chosen, rejected = chosen[-cfg.max_length :], rejected[-cfg.max_length :]
    if not chosen or not rejected or not prompt:
        raise BadRow(
            "too_long",
            f"{'the prompt' if not prompt else 'a response'} is empty after truncation to"
            f" data.max_length={cfg.max_length}; raise data.max_length, lower"
            " data.max_prompt_length, or change data.truncation",
        )
    if changed:
        summary.note("truncated", pair.where, f"cut to data.max_length={cfg.max_length}")
    return PairExample(prompt, chosen, rejected, pair.where, pair.user_id)


def _refuse_identical(chosen, rejected, cfg: DataConfig) -> None:
    if chosen == rejected:
        raise BadRow(
            "identical_pair",
            "chosen and rejected are identical, so the pair carries no preference",
            policy=cfg.identical_pairs,
        )


def row_to_pair(
    fields: dict, where: str, cfg: DataConfig, tokenizer, summary: DataSummary
) -> PairExample:
    if "prompt" in fields:
        prompt, chosen, rejected = text_or_chat_fields(fields, ("prompt", "chosen", "rejected"))
        _refuse_identical(chosen, rejected, cfg)
    else:
        for key in ("chosen", "rejected"):
            if fields.get(key) is None:
                raise BadRow("missing_field", f"missing required field {key!r}")
        chosen, rejected = text_or_chat_fields(fields, ("chosen", "rejected"))
        _refuse_identical(chosen, rejected, cfg)
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not prompt:
            raise BadRow(
                "no_prompt",
                "chosen and rejected share no beginning, so there is no implicit prompt; add a"
                " 'prompt' column",
            )
    if not chosen or not rejected:
        raise BadRow("empty_field", "a response is empty after removing the shared prompt")
    prompt_c, chosen_ids = _response_tokens(tokenizer, prompt, chosen, cfg, where, summary)
    prompt_r, rejected_ids = _response_tokens(tokenizer, prompt, rejected, cfg, where, summary)
    if prompt_c != prompt_r:
        raise BadRow(
            "prompt_mismatch",
            "the prompt tokenizes differently before chosen and before rejected (the chat"
            " template renders it differently); check the template",
        )
    pair = PairExample(
        prompt_c, chosen_ids, rejected_ids, where, user_id_of(fields, cfg.user_id_column)
    )
    return truncate_pair(pair, cfg, summary)


def read_pairs(
    path: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    summary: DataSummary,
    rows: Iterable[Row] | None = None,
) -> list[PairExample]:
    """The pairs of `path` (its `rows`, when already read)."""

    def convert(row) -> PairExample:
        if not ({"chosen", "rejected"} & row.fields.keys()):
            raise DataError(
                f"{row.where}: a preference row needs 'chosen' and 'rejected' (and usually"
                f" 'prompt'); this row has {sorted(row.fields)}"
            )
        return row_to_pair(row.fields, row.where, cfg, tokenizer, summary)

    return convert_rows(path, read_rows(path) if rows is None else rows, summary, convert)


def load_preference_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    scrub: ScrubConfig | None = None,
) -> tuple[list[PairExample], list[PairExample], DataSummary]:
    def read(path: str, summary: DataSummary, rows: Iterable[Row]) -> list[PairExample]:
        return read_pairs(path, cfg, tokenizer, summary, rows)

    return load_splits(cfg, seed, read, "preference pairs", scrub)
