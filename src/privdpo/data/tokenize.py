"""Tokenizing a row made of segments, with exact prompt/response boundaries.

A row is a list of `Segment`s whose texts, concatenated, form the full sequence (a prompt
then a completion, or the turns of a chat rendered by the tokenizer's template). Only the
tokens of `trainable` segments get labels.

The boundary problem: BPE merges across the join, so tokenize(prompt + completion) need not
start with tokenize(prompt). The response tokens must be what the model produces *after*
the prompt's tokens at generation time, so for each segment we tokenize the text up to its
end and check that the tokens so far are a prefix. On a mismatch the config decides:
`split` tokenizes the remaining segments on their own and concatenates (the row is kept and
counted as `boundary_split`), `error` stops, `drop` drops the row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from privdpo.data.summary import DataSummary

IGNORE = -100  # label of a token without loss


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss


class BadRow(Exception):
    """A row that cannot be used; `reason` is the summary key, the message the fix.
    `policy` ("error"/"drop") is set when a config key of its own decides, overriding
    `data.on_bad_row`."""

    def __init__(self, reason: str, problem: str, policy: str | None = None):
        self.reason = reason
        self.policy = policy
        super().__init__(problem)


@functools.lru_cache(maxsize=1024)
def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special: bool) -> tuple[int, ...]:
    """Token ids of `text`, cached: a pair's prompt is tokenized for both of its responses,
    and the tokenizer call's Python overhead dominates loading large files."""
    return tuple(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def tokenize_segments(
    tokenizer: PreTrainedTokenizerBase,
    segments: list[Segment],
    *,
    templated: bool,
    append_eos: bool,
    boundary_mismatch: str,
    where: str,
    summary: DataSummary,
) -> Tokenized:
    """Token ids and labels for `segments`; see the module docstring for boundaries.

    `templated` text (rendered by a chat template) already carries its special tokens, so
    the tokenizer adds none; plain text gets the tokenizer's own (e.g. a BOS token).
    """
    add_special = not templated
    ids: list[int] = []
    labels: list[int] = []
    text_so_far = ""
    split = False
    for seg in segments:
        text_so_far += seg.text
        if not split:
            cumulative = _encode(tokenizer, text_so_far, add_special)
            if list(cumulative[: len(ids)]) == ids:
                new = list(cumulative[len(ids) :])
            else:
                if boundary_mismatch != "split":
                    raise BadRow(
                        "boundary_mismatch",
                        "tokenizing the text across a prompt/response boundary changes the"
                        " prompt's tokens; set data.boundary_mismatch=split to tokenize the"
                        " parts separately",
                        policy=boundary_mismatch,
                    )
                split = True
                summary.note(
                    "boundary_split",
                    where,
                    "joining prompt and response changed tokens; parts tokenized separately",
                )
        if split:
            new = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        if not new and seg.text.strip():
            raise BadRow(
                "encodes_to_nothing",
                f"the tokenizer encodes the {'response' if seg.trainable else 'prompt'} text"
                f" ({len(seg.text)} characters) to no tokens; the tokenizer cannot represent"
                " it: check model.path's tokenizer (its vocabulary and unk_token)",
            )
        ids += new
        labels += new if seg.trainable else [IGNORE] * len(new)
    if (
        append_eos
        and tokenizer.eos_token_id is not None
        and (not ids or ids[-1] != tokenizer.eos_token_id)
    ):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if segments[-1].trainable else IGNORE)
    return Tokenized(ids, labels)


def truncate(
    tok: Tokenized, max_length: int, side: str, where: str, summary: DataSummary
) -> Tokenized:
    """Cut to `max_length` tokens keeping the start or the end; a row with no label left is
    too long to keep."""
    if len(tok.input_ids) <= max_length:
        return tok
    cut = slice(0, max_length) if side == "keep_start" else slice(-max_length, None)
    tok = Tokenized(tok.input_ids[cut], tok.labels[cut])
    # Labels are shifted inside the loss, so the first token is never a target.
    if all(label == IGNORE for label in tok.labels[1:]):
        raise BadRow(
            "too_long",
            f"no response token left within data.max_length={max_length} (the prompt fills"
            " it); raise data.max_length, set data.truncation=keep_end, or shorten the prompt",
        )
    summary.note("truncated", where, f"longer than data.max_length={max_length}; cut ({side})")
    return tok
