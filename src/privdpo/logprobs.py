"""Per-token log-probabilities of the label tokens.

Labels are aligned with `input_ids` (Hugging Face convention): the logits at position t
predict the token at t + 1, so both are shifted by one here and nowhere else.
"""

from __future__ import annotations

import torch

from privdpo.data.tokenize import IGNORE


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next label token, and the mask of tokens that count.

    logits: [B, T, V]; labels: [B, T] with IGNORE where there is no loss.
    Returns (logps [B, T-1] float32, zero where masked; mask [B, T-1] bool).
    """
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0)
    # log_softmax then gather: the same numbers as cross-entropy, one token at a time.
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length of every sequence in `batch`.

    batch: `input_ids`, `attention_mask`, `labels` [N, T]. Returns (logps [N] float32,
    num_tokens [N] float32): the log-probability of each sequence's label tokens given
    everything before them, summed over the sequence.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logps(logits, batch["labels"])
    return logps.sum(-1), mask.sum(-1).float()
