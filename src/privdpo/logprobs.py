"""Log-probabilities of the label tokens, from the last hidden states, in vocabulary tiles.

The language-model head is never applied to the whole [tokens, vocab] logits at once, and
never to a position that predicts no label (prompt positions, padding): the decoder's
last hidden states are gathered at the positions that predict a label token
(`TokenBatch.label_source`), and `LabelLogps` runs the head over tiles of the vocabulary,
each tile for all label tokens at once. Per tile it computes the logits (in the head's
dtype) and folds their logsumexp and the label's logit into float32 running values; the
backward pass recomputes each tile rather than keeping it. So the head's memory is one
[tokens, tile] block, whatever the vocabulary, and each tile's weight gradient is one
matrix product over all tokens (accumulated in float32 inside the product, never rounded
tile by tile or token block by token block).

Liger-kernel's fused linear cross-entropy follows the same idea for a scalar loss; here
the output is the per-token log-prob (DPO needs per-sequence sums, and differential
privacy per-unit gradients), written in plain PyTorch so that it runs the same on the CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from privdpo.attention import ATTENTION, PackedAttention, mask_argument, packable, register

# Bytes of one tile's float32 logits: at most 256 MiB (15k vocabulary columns for 4,352
# label tokens), and at least MIN_TILE columns.
TILE_BYTES = 2**28
MIN_TILE = 256


def vocab_tiles(vocab_size: int, num_tokens: int) -> list[tuple[int, int]]:
    """[(start, end), ...] column ranges covering the vocabulary: TILE_BYTES of float32
    logits for `num_tokens` rows, a multiple of MIN_TILE columns."""
    width = max(MIN_TILE, TILE_BYTES // (4 * max(1, num_tokens)))
    width = min(vocab_size, -(-width // MIN_TILE) * MIN_TILE)
    return [(v, min(v + width, vocab_size)) for v in range(0, vocab_size, width)]


def tile_logits(hidden, weight, bias, v0: int, v1: int) -> torch.Tensor:
    """Logits of vocabulary columns v0..v1 for every row of `hidden`, in the head's dtype."""
    logits = hidden @ weight[v0:v1].t()
    return logits if bias is None else logits + bias[v0:v1]


def tile_stats(logits, target, v0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over the tile, the target's logit or 0 when the target is outside the
    tile), float32 [n] each."""
    z = logits.float()
    inside = (target >= v0) & (target < v0 + z.shape[1])
    picked = z.gather(1, (target - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.logsumexp(z, dim=-1), torch.where(inside, picked, 0.0)


def tile_grad(logits, lse, target, grad, v0: int, dtype) -> torch.Tensor:
    """d (sum_i grad_i * logp_i) / d logits of the tile: grad_i (onehot(target_i) -
    softmax_i) restricted to columns v0.., as `dtype` (the head's, as autograd casts)."""
    z = logits.float()
    d = z.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # in place on the float copy
    inside = (target >= v0) & (target < v0 + z.shape[1])
    column = (target - v0).clamp(0, z.shape[1] - 1)[:, None]
    d = d.scatter_add_(1, column, torch.where(inside, grad, 0.0)[:, None])
    return d.to(dtype)


@functools.cache
def _compiled(fn):
    # One fused kernel per tile instead of a float32 copy and several passes over it.
    return torch.compile(fn, dynamic=True)


class LabelLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for each row of h, over vocabulary tiles.

    Forward: hidden [N, H], weight [V, H], bias [V] or None, target [N] -> [N] float32.
    Backward: d logp / d logits = g (onehot(target) - softmax), recomputed per tile; each
    tile's weight gradient is one product over all N tokens, the hidden states' gradient
    is accumulated over tiles in float32. A `sink` (differential privacy) is given each
    tile's logits gradient and the hidden states, to form per-unit gradients.
    `compiled`: the per-tile elementwise work through torch.compile (train.compile).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, sink, compiled: bool = False):
        stats = _compiled(tile_stats) if compiled else tile_stats
        lse = torch.full((hidden.shape[0],), -torch.inf, dtype=torch.float32, device=hidden.device)
        picked = torch.zeros_like(lse)
        for v0, v1 in vocab_tiles(weight.shape[0], hidden.shape[0]):
            tile_lse, tile_picked = stats(tile_logits(hidden, weight, bias, v0, v1), target, v0)
            lse = torch.logaddexp(lse, tile_lse)
            picked += tile_picked
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.sink, ctx.compiled = sink, compiled
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_of = _compiled(tile_grad) if ctx.compiled else tile_grad
        grad_h = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        )
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for v0, v1 in vocab_tiles(weight.shape[0], hidden.shape[0]):
            logits = tile_logits(hidden, weight, bias, v0, v1)
            d = grad_of(logits, lse, target, grad, v0, hidden.dtype)
            del logits
            if need_h:
                add_product(grad_h, d, weight[v0:v1])
            if need_w:
                torch.mm(d.t(), hidden, out=grad_w[v0:v1])
            if need_b:
                grad_b[v0:v1] = d.sum(0)
            if ctx.sink is not None:
                ctx.sink.add(v0, v1, d, hidden)
        if ctx.sink is not None:
            ctx.sink.keep(hidden, target, lse, grad)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, grad_b, None, None, None)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, with the product of half-precision inputs kept in float32
    (not rounded to bf16 before it is added)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(a, b).float()


def label_logps(
    hidden: torch.Tensor, head: nn.Module, target: torch.Tensor, sink=None, compiled=False
) -> torch.Tensor:
    """[N] float32 log-prob of each `target` token given its hidden state [N, H].

    A plain `nn.Linear` head runs through `LabelLogps`; any other head (say, one with LoRA
    adapters) is called on checkpointed chunks, so it also never holds the whole logits.
    """
    if type(head) is nn.Linear:
        return LabelLogps.apply(hidden, head.weight, head.bias, target, sink, compiled)
    if sink is not None:
        raise ValueError("a per-unit gradient sink needs a plain nn.Linear head")
    # Token chunks of about TILE_BYTES of float32 logits, each recomputed in the backward.
    chunk = max(16, TILE_BYTES // (4 * head.weight.shape[0]))
    parts = [
        checkpoint(
            _chunk_logps, head, hidden[s : s + chunk], target[s : s + chunk], use_reentrant=False
        )
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(head, hidden, target):
    logits = head(hidden).float()
    return logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def decoder_hidden(model, batch, attention: str = "auto") -> torch.Tensor:
    """The decoder's last hidden states of `batch`, flat: [R * T, H]."""
    decoder = model.get_decoder()
    if batch.packed:
        if model.config._attn_implementation != ATTENTION:
            if not packable(model):
                raise ValueError("packed batches need full-attention layers; use the padded layout")
            model.set_attn_implementation(register())  # SDPA for every other call
        packed = PackedAttention(batch, attention)
        dropout = getattr(model.config, "attention_dropout", 0.0) if model.training else 0.0
        dtype = model.get_input_embeddings().weight.dtype
        device = batch.input_ids.device
        extra = {"privdpo_layout": packed.layout(device, dtype, dropout or 0.0)}
        mask = mask_argument(packed, device)
    else:
        mask, extra = batch.attention_mask, {}
    out = decoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=mask,
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state.flatten(0, 1)


def token_logps(
    model, batch, sink=None, attention: str = "auto", compiled: bool = False
) -> torch.Tensor:
    """[N] float32 log-prob of every label token of `batch` (a `TokenBatch` on the
    model's device), in the batch's label order. `sink`: DP's per-unit head gradients;
    `attention`: the packed-attention backend; `compiled`: fuse the head's per-chunk work
    with torch.compile (train.compile)."""
    hidden = decoder_hidden(model, batch, attention).index_select(0, batch.label_source)
    head = model.get_output_embeddings()
    return label_logps(hidden, head, batch.label_target, sink, compiled)


def sequence_logps(
    model, batch, sink=None, attention: str = "auto", compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-prob and label-token count of every sequence: ([S], [S]) float32.

    The log-probability of each sequence's label tokens given everything before them in
    its own sequence. Arguments as `token_logps`."""
    logps = token_logps(model, batch, sink, attention, compiled)
    sums = torch.zeros(batch.num_sequences, dtype=torch.float32, device=logps.device)
    return sums.index_add_(0, batch.label_sequence, logps), batch.sequence_tokens
