"""Losses as pure functions. Each docstring gives tensor shapes and the source."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Negative log-likelihood summed over label tokens, divided by `num_tokens`.

    token_logps, mask: [B, T]. `num_tokens` is the count of label tokens in the whole
    logical batch (all micro-batches), so accumulating micro-batch losses gives exactly
    the token-mean NLL of the logical batch, however it is split.
    """
    return -(token_logps * mask).sum() / num_tokens
