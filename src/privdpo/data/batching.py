"""Turning tokenized examples into padded tensors.

Kept behind one function so that a later packing (padding-free) collator can replace it.
"""

from __future__ import annotations

import torch

from privdpo.data.tokenize import IGNORE


def pad_batch(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` and `labels` to the longest example.

    Returns `input_ids` [B, T], `attention_mask` [B, T] (1 = real token) and `labels`
    [B, T] (IGNORE on padding and on tokens without loss).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_batch(pairs: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of `pairs` in one padded batch, for one forward pass.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (the order TRL uses), with
    labels only on the response tokens. Returns `input_ids`, `attention_mask`, `labels`,
    each [2B, T].
    """
    sequences = [
        _Seq(p.prompt_ids + response, [IGNORE] * len(p.prompt_ids) + response)
        for responses in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs])
        for p, response in zip(pairs, responses, strict=True)
    ]
    return pad_batch(sequences, pad_id)


class _Seq:
    __slots__ = ("input_ids", "labels")

    def __init__(self, input_ids: list[int], labels: list[int]):
        self.input_ids = input_ids
        self.labels = labels
