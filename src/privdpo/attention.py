"""Attention over packed sequences, registered with transformers as `privdpo`.

A packed batch (`data/batching.py`) is one row of several segments. Within a segment a
query attends causally to earlier tokens of its own branch and to the segment's shared
prefix; never to another segment, and a rejected response never to the chosen one.

privdpo loads every model with attention implementation `privdpo`. A packed forward pass
passes the decoder the batch's layout as the keyword argument `privdpo_layout`, which
transformers hands on to every layer's attention: plain tensors and integers, so under
`train.compile` a decoder layer is one graph with its attention in it. The layout also
rides on the mask, for a model whose layers drop keyword arguments. Any other call
(generation, a padded batch) is transformers' own SDPA attention with its own mask.

Backends (`train.attention`):
- `varlen`: FlashAttention-2 for variable-length sequences through PyTorch's
  `torch.nn.attention.varlen.varlen_attn` (CUDA, bf16/fp16). Each query block (a prefix
  with its first continuation; each later continuation) gets its own key set, gathered
  from the packed keys; the causal mask is aligned to the block's last key, so a
  continuation's first token sees the whole prefix. Nothing is spent on pairs of tokens
  that never meet.
- `flex`: FlexAttention with a block mask built from the same per-token segment and
  branch ids (compiled; skips the blocks that are fully masked).
- `sdpa`: PyTorch's scaled_dot_product_attention with a dense [L, L] boolean mask: exact
  and simple, the reference the others are tested against, and the CPU path. Its cost
  grows with the square of the packed length, so it is not for long GPU batches.
`auto` is varlen on CUDA when it applies (no attention dropout, half precision), else sdpa.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "privdpo"
BACKENDS = ("auto", "varlen", "flex", "sdpa")


class PackedAttention:
    """The packed layout of one batch and the backend that runs it. Derived tensors are
    built on first use and shared by every layer.

    The layout reaches the layers as the decoder's keyword argument `privdpo_layout` (see
    `layout`): plain tensors and integers, so a compiled decoder layer traces the whole
    attention into its graph instead of breaking around it."""

    def __init__(self, batch, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.batch = batch
        self.backend = backend
        self._cache: dict = {}

    def resolve(self, device: torch.device, dtype: torch.dtype, dropout: float) -> str:
        """The backend for queries of `dtype` on `device`."""
        if self.backend != "auto":
            return self.backend
        if device.type == "cuda" and dropout == 0 and dtype in (torch.bfloat16, torch.float16):
            if _VARLEN is not None:
                return "varlen"
        return "sdpa"

    def layout(self, device, dtype: torch.dtype, dropout: float) -> dict:
        """`privdpo_layout` for queries of `dtype` on `device`: {backend name: its inputs}.
        varlen: (query starts, key starts, longest query block, longest key block, key
        gather index or None); sdpa: the dense mask; flex: the block mask."""
        device = torch.device(device)
        backend = self.resolve(device, dtype, dropout)
        if dropout and backend != "sdpa":
            raise ValueError(f"train.attention={backend} has no attention dropout; use sdpa")
        if backend == "varlen":
            return {"varlen": self._blocks(device)}
        if backend == "flex":
            return {"flex": self._block_mask(device)}
        return {"sdpa": self.dense_mask(device)}

    def __call__(self, query, key, value, scaling: float | None, dropout: float):
        """query [1, Hq, L, D], key/value [1, Hkv, L, D] -> output [1, L, Hq, D]."""
        return attend(
            self.layout(query.device, query.dtype, dropout), query, key, value, scaling, dropout
        )

    # ---- sdpa: a dense mask -----------------------------------------------------------
    def dense_mask(self, device) -> torch.Tensor:
        """[1, 1, L, L] True where query q may attend key k."""
        if "dense" not in self._cache:
            seg, branch = self.batch.segment.to(device), self.batch.branch.to(device)
            idx = torch.arange(len(seg), device=device)
            same = seg[:, None] == seg[None, :]
            causal = idx[None, :] <= idx[:, None]
            visible = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
            self._cache["dense"] = (same & causal & visible)[None, None]
        return self._cache["dense"]

    # ---- varlen: FlashAttention over query blocks --------------------------------------
    def _blocks(self, device):
        if "blocks" not in self._cache:
            b = self.batch
            cu_q = torch.tensor([0, *_cumsum(b.query_lengths)], dtype=torch.int32)
            cu_k = torch.tensor([0, *_cumsum(b.key_lengths)], dtype=torch.int32)
            index = b.key_index.to(device) if b.key_index is not None else None
            self._cache["blocks"] = (
                cu_q.to(device, non_blocking=True),
                cu_k.to(device, non_blocking=True),
                max(b.query_lengths),
                max(b.key_lengths),
                index,
            )
        return self._cache["blocks"]

    # ---- flex: a block mask ------------------------------------------------------------
    def _block_mask(self, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if "block" not in self._cache:
            seg = self.batch.segment.to(device)
            branch = self.batch.branch.to(device)

            def mask_mod(b, h, q, k):
                visible = (branch[k] == 0) | (branch[k] == branch[q])
                return (seg[q] == seg[k]) & (k <= q) & visible

            length = len(seg)
            self._cache["block"] = create_block_mask(
                mask_mod, None, None, length, length, device=device
            )
        return self._cache["block"]


def attend(layout: dict, query, key, value, scaling, dropout) -> torch.Tensor:
    """Attention over a packed batch from its `layout` (`PackedAttention.layout`):
    query [1, Hq, L, D], key/value [1, Hkv, L, D] -> output [1, L, Hq, D]. Tensor work
    only (flex aside), so torch.compile traces it within a decoder layer."""
    if "varlen" in layout:
        return _varlen_attention(query, key, value, scaling, *layout["varlen"])
    if "flex" in layout:
        return _flex_attention(query, key, value, layout["flex"], scaling)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=layout["sdpa"],
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _varlen_attention(query, key, value, scaling, cu_q, cu_k, max_q, max_k, index):
    """Each query block against its key block, causal from the block's last key."""
    q = query[0].transpose(0, 1)  # [L, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if index is not None:  # later continuations see the prefix again: gather its keys
        k, v = k.index_select(0, index), v.index_select(0, index)
    kwargs = {"scale": scaling}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = _VARLEN(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, **kwargs
    )
    return out.unsqueeze(0)


@torch.compiler.disable  # flex attention compiles itself
def _flex_attention(query, key, value, block_mask, scaling):
    out = _compiled_flex()(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _find_varlen():
    """(varlen_attn, its parameter names), or (None, set()) when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_PARAMS = _find_varlen()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def privdpo_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """The attention function transformers calls for every layer of a privdpo model: a
    packed batch's layout comes as `privdpo_layout` (traced by a compiled layer) or, for a
    model whose layers do not pass keyword arguments on, on the mask; anything else is
    transformers' SDPA attention."""
    layout = kwargs.pop("privdpo_layout", None)
    if layout is not None:
        return attend(layout, query, key, value, scaling, dropout), None
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@torch.compiler.disable  # transformers' own SDPA, or a layout from the mask: eager
def _eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    packed = getattr(attention_mask, "privdpo_packed", None)
    if packed is not None:
        return packed(query, key, value, scaling, dropout), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def register() -> str:
    """Make `privdpo` a transformers attention implementation (idempotent); its masks for
    ordinary calls are SDPA's."""
    AttentionInterface.register(ATTENTION, privdpo_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def packable(model) -> bool:
    """Whether packed batches can run through `model`: every layer is full attention (no
    sliding windows, which packing would ignore)."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"}


def mask_argument(attention: PackedAttention, device) -> torch.Tensor:
    """The `attention_mask` to pass to a decoder for a packed batch.

    transformers takes a 4D tensor as a prepared mask and hands it to every layer's
    attention unchanged, so the packed layout rides on one: an empty [1, 1, 0, 0] tensor
    carrying the `PackedAttention` as an attribute. Should a model's code ever hand it to
    stock attention instead, the empty shape fails loudly rather than attending wrongly."""
    carrier = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
    carrier.privdpo_packed = attention
    return carrier
