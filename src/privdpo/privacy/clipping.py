"""Per-unit gradient clipping for DP-SGD, with per-layer gradient samplers.

A *unit* is what one privacy unit contributes to a micro-batch: one SFT example, one DPO
pair (its prompt, chosen and rejected tokens), or all of a user's rows at the user level.
In a `TokenBatch` the tokens of a unit are one contiguous range of the flat token axis
(and its label tokens one range of the label axis), whether the batch is packed (several
units in one row, prompts shared) or padded; so each unit's gradient is a sum over a
token range ("segment sums"), never over batch rows. No library offers that grouping
(Opacus clips per batch row).

How: a forward hook on each Linear and RMSNorm layer with trainable parameters routes
the layer's output through an autograd function that is the identity forward and saves
the layer's input (recomputed under gradient checkpointing). Its backward computes each
unit's gradient of the layer's parameters from that input and the output's gradient, and
returns it as the gradient of a zero "probe" input: a [U, *shape] tensor per parameter,
made once for each unit count a micro-batch has (one element of memory, all its strides
0) and carried on the module as `privdpo_probes`. It also returns the squared per-unit
norms as the gradient of one [U] input shared by every layer, which autograd sums over the
layers. That is all tensor work on tensor inputs, so a compiled decoder layer
(`train.compile`) traces it into its own graph: no Python runs between a layer's kernels
in the backward pass. (Layers that read one input, q/k/v and gate/up, each gather its
rows per unit: eager, that gather is repeated; whether the compiler merges the repeats was
not checked.) Autograd's own batch-summed weight gradients are switched off, as they would
be thrown away.

The token embedding (outside the compiled layers) and the head hand their per-unit
gradients to Python sinks instead: the head runs inside `logprobs.LabelLogps`, which hands
each chunk's logits gradient to the head sink. Their [U, width] buffers are shared when
the two are tied, and normed after the backward pass. Each unit's gradient norm over all
parameters is then known (in float32); each unit is scaled by min(1, C / norm) and the
scaled gradients are summed, one [1, U] x [U, n] product per parameter, into float32
sums (on a GPU by the product itself). One forward and one backward pass, as without
privacy.

Ghost clipping (`ghost=True`), for the layers whose per-unit gradients are big: the token
embedding and the head ([U, vocab, hidden] each, the same tensor when tied). Their
per-unit norms come from Gram matrices instead (Li et al. 2022, "Large Language Models
Can Be Strong Differentially Private Learners"): for the head, ||sum_s d_s h_s^T||^2 =
sum_{s,s'} (d_s . d_s')(h_s . h_s') over a unit's label tokens (d the logits gradient, h
the hidden state); for the embedding, the gradient rows summed per distinct token id;
and, when tied, twice the inner product of the two parts. The clipped sum is then formed
in a second pass: the embedding's rows reweighted by each unit's clip factor, the head's
logits gradients recomputed chunk by chunk and reweighted. Memory O(tokens x hidden)
instead of O(units x vocab x hidden).

Supported modules (the layers of Llama/Qwen-style models and of LoRA adapters):
`nn.Linear` (weight and bias), `nn.Embedding` and RMSNorm layers (a `weight` scaling the
root-mean-square-normalized input, checked numerically when attached). A parameter shared
by the input and output embeddings (tied) gets the sum of both contributions. A parameter
shared by other layers, and any other module with a trainable parameter, is refused before
training starts, because its gradient would escape clipping and void the guarantee.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from privdpo.errors import UserError
from privdpo.logprobs import add_product, tile_grad, tile_logits, vocab_tiles

# A ghost norm in half precision is computed from rounded values; inflating it by 1/64
# before clipping keeps every clipped unit gradient at or under C despite that rounding.
HALF_GHOST_MARGIN = 1 + 2.0**-6
# A vocabulary layer's per-unit row norm is reduced in chunks of this many columns, then
# over chunks: one float32 reduction over a row of a million values drifts by 1e-5 (CPU).
NORM_CHUNK = 4096


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


def _rms_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise UserError(f"{type(module).__name__}: RMSNorm without an epsilon attribute")


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The input of RMSNorm's weight multiplication, computed as Llama/Qwen do (in fp32)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def _check_rmsnorm(module: nn.Module) -> None:
    """Refuse an RMSNorm whose forward is not weight * normalize(x) (e.g. Gemma's 1 + w)."""
    w = module.weight
    x = torch.randn(2, 3, w.shape[-1], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        expected = w * _rms_normalize(x, _rms_eps(module))
        got = module(x)
    if not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-4):
        raise UserError(
            f"{type(module).__name__}: this RMSNorm does not compute weight * x / rms(x), so"
            " privdpo cannot compute its per-unit gradients; freeze it or use LoRA"
        )


class _Units:
    """A micro-batch's units: offsets on the token and label axes, and the device tensors
    the per-unit gradients are computed from, built once per micro-batch before the
    forward pass (a compiled layer reads them as graph inputs)."""

    def __init__(self, batch, device, dtypes=(torch.float32,)):
        self.tokens = batch.unit_tokens
        self.labels = batch.unit_labels
        self.count = len(self.tokens) - 1
        self.device = device
        self._token_unit = None
        self._label_unit = None
        # [U, Tmax] index into the flat token axis: each unit's tokens in one row, padded
        # to the longest unit (padding points at the unit's first token), so per-unit
        # products are one batched matmul; its mask of real tokens as [U, Tmax, 1].
        ranges = self.token_ranges()
        width = max(b - a for a, b in ranges)
        index = torch.zeros((len(ranges), width), dtype=torch.long)
        mask = torch.zeros((len(ranges), width, 1), dtype=torch.bool)
        for u, (a, b) in enumerate(ranges):
            index[u, : b - a] = torch.arange(a, b)
            index[u, b - a :] = a
            mask[u, : b - a] = True
        self.padded_index = index.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        rows = torch.arange(self.count, device=device)
        member = rows[:, None] == self.token_unit()  # [U, tokens]: the unit's tokens
        self._padding_mask = {torch.bool: mask}  # dtype -> [U, Tmax, 1]
        self._membership = {torch.bool: member}  # dtype -> [U, tokens]
        for dtype in dtypes:  # the parameters' dtypes, before a compiled layer reads them
            self.padding_mask(dtype)
            self.membership(dtype)

    def padding_mask(self, dtype) -> torch.Tensor:
        mask = self._padding_mask.get(dtype)
        if mask is None:
            mask = self._padding_mask[dtype] = self._padding_mask[torch.bool].to(dtype)
        return mask

    def membership(self, dtype) -> torch.Tensor:
        """[U, tokens] 0/1 in `dtype`: a product with it sums each unit's tokens (a
        scatter-add into a few rows that all the tokens target is atomic on a GPU and
        took 335 ms of a 540 ms private step in job 6)."""
        member = self._membership.get(dtype)
        if member is None:
            member = self._membership[dtype] = self._membership[torch.bool].to(dtype)
        return member

    def token_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.tokens[:-1], self.tokens[1:], strict=True))

    def label_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.labels[:-1], self.labels[1:], strict=True))

    def token_unit(self) -> torch.Tensor:
        if self._token_unit is None:
            self._token_unit = _unit_index(self.tokens, self.device)
        return self._token_unit

    def label_unit(self) -> torch.Tensor:
        if self._label_unit is None:
            self._label_unit = _unit_index(self.labels, self.device)
        return self._label_unit


def _unit_index(offsets: list[int], device) -> torch.Tensor:
    lengths = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    index = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return index.to(device, non_blocking=True)


class _GhostEmbedding:
    """The token embedding's per-unit gradient rows, summed per distinct (unit, token id):
    a [R, hidden] tensor instead of [U, vocab, hidden]. Built from the host's input ids."""

    def __init__(self, input_ids: torch.Tensor, units: _Units, vocab: int):
        flat = input_ids.flatten()
        unit = torch.repeat_interleave(
            torch.arange(units.count),
            torch.tensor([b - a for a, b in units.token_ranges()]),
        )
        keys, inverse = torch.unique(unit * vocab + flat, return_inverse=True)
        device = units.device
        self.inverse = inverse.to(device, non_blocking=True)  # token -> row
        self.row_unit = (keys // vocab).to(device, non_blocking=True)
        self.row_id = (keys % vocab).to(device, non_blocking=True)
        # Rows of unit u are one contiguous range (keys are sorted by unit first).
        counts = torch.bincount(keys // vocab, minlength=units.count).tolist()
        self.unit_rows = [0]
        for c in counts:
            self.unit_rows.append(self.unit_rows[-1] + c)
        self.host_ids = (keys % vocab).tolist()  # sorted within each unit's rows
        self.rows: torch.Tensor | None = None  # [R, hidden] summed gradient rows

    def add(self, g: torch.Tensor) -> None:
        rows = torch.zeros((len(self.row_id), g.shape[-1]), dtype=torch.float32, device=g.device)
        rows.index_add_(0, self.inverse, g.reshape(-1, g.shape[-1]).float())
        self.rows = rows if self.rows is None else self.rows + rows


class _GhostHead:
    """What the head's ghost norm and second pass need: per unit, the Gram matrix of its
    logits gradients (summed over vocabulary tiles) and of its hidden states; the rows of
    B_u = sum_s d_s h_s^T at the unit's own token ids (for the tied cross term); and the
    inputs to recompute the logits gradients."""

    def __init__(self, units: _Units, device, embedding: _GhostEmbedding | None):
        self.units = units
        self.device = device
        self.embedding = embedding
        self.grams: list[torch.Tensor | None] = [None] * units.count  # [T_u, T_u] of d
        self.cross_rows: torch.Tensor | None = None  # [R, hidden], on the first tile
        self.gram: torch.Tensor | None = None  # [U] squared norms, once kept
        self.kept = None

    def add(self, v0: int, v1: int, d: torch.Tensor, h: torch.Tensor) -> None:
        e = self.embedding
        if e is not None and self.cross_rows is None:
            self.cross_rows = torch.zeros(
                (len(e.row_id), h.shape[1]), dtype=torch.float32, device=h.device
            )
        for u, (a, b) in enumerate(self.units.label_ranges()):
            if a == b:
                continue
            du = d[a:b].float()
            gram = du @ du.t()
            self.grams[u] = gram if self.grams[u] is None else self.grams[u] + gram
            if e is not None:  # B_u's rows at the unit's ids that fall in this tile
                ra, rb = e.unit_rows[u], e.unit_rows[u + 1]
                ids = e.host_ids[ra:rb]
                lo, hi = bisect.bisect_left(ids, v0), bisect.bisect_left(ids, v1)
                if lo < hi:
                    cols = e.row_id[ra + lo : ra + hi] - v0
                    self.cross_rows[ra + lo : ra + hi] = (
                        du.index_select(1, cols).t() @ h[a:b].float()
                    )

    def keep(self, hidden, target, lse, grad) -> None:
        """The backward pass is done: fold the Gram matrices into [U] squared norms."""
        self.kept = (hidden, target, lse, grad)
        self.gram = torch.zeros(self.units.count, dtype=torch.float32, device=self.device)
        for u, (a, b) in enumerate(self.units.label_ranges()):
            if self.grams[u] is not None:
                hu = hidden[a:b].float()
                self.gram[u] = (self.grams[u] * (hu @ hu.t())).sum()
        self.grams = [None] * self.units.count


class _HeadSink:
    """Receives the head's logits gradients chunk by chunk from `LabelLogps`."""

    def __init__(self, owner: PerUnitGradients, head: nn.Linear):
        self.owner = owner
        self.head = head

    def add(self, v0: int, v1: int, d: torch.Tensor, h: torch.Tensor) -> None:
        self.owner._head_tile(self.head, v0, v1, d, h)

    def keep(self, hidden, target, lse, grad) -> None:
        ghost = self.owner._ghost_heads.get(id(self.head.weight))
        if ghost is not None:
            ghost.keep(hidden, target, lse, grad)


class _Tap(torch.autograd.Function):
    """The identity on the token embedding's output whose backward hands (the ids, the
    output's gradient) to `sink`, in Python: the embedding runs outside the compiled
    decoder layers, and its per-unit rows go to a ghost sum or to a [U, vocab, hidden]
    buffer that the head's tiles share when tied."""

    @staticmethod
    def forward(ctx, output, x, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.sink(x, grad.detach())
        return grad, None, None


def _squares(g: torch.Tensor) -> torch.Tensor:
    """[U] squared norm of each unit's gradient `g` [U, ...], in float32."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32).square()


def _unit_outer(g2, x2, index, mask) -> torch.Tensor:
    """[U, out, in]: for each unit, the sum over its tokens of g x^T (a Linear weight's
    gradient). One unit alone is one matrix product; several are one batched product over
    their padded token rows (`index`, `mask`: `_Units.padded_index` and its mask), the
    input's padding rows zeroed so that they add nothing."""
    if index.shape[0] == 1:
        return (g2.t() @ x2).unsqueeze(0)
    return torch.bmm(g2[index].transpose(1, 2), x2[index] * mask)


class _LinearGrads(torch.autograd.Function):
    """The identity on a Linear's output. Its backward returns, as the gradients of two
    zero inputs (`weight_probe` [U, out, in] and `bias_probe` [U, out], None for a frozen
    one), each unit's gradient of the weight and the bias, and, as the gradient of
    `squares` [U], their squared norms (float32). Plain tensor work on tensor inputs, so
    torch.compile traces it into a compiled decoder layer's backward graph."""

    @staticmethod
    def forward(ctx, output, x, weight_probe, bias_probe, squares, index, mask, member):
        ctx.save_for_backward(x, index, mask, member)
        ctx.weight, ctx.bias = weight_probe is not None, bias_probe is not None
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        x, index, mask, member = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # the flat token axis
        gw = gb = None
        squares = []
        if ctx.weight:
            gw = _unit_outer(g2, x.reshape(-1, x.shape[-1]), index, mask)
            squares.append(_squares(gw))
        if ctx.bias:
            gb = member @ g2  # each unit's token sum (the product sums in float32 inside)
            squares.append(_squares(gb))
        return grad, None, gw, gb, sum(squares[1:], squares[0]), None, None, None


class _NormGrads(torch.autograd.Function):
    """`_LinearGrads` for an RMSNorm's weight: each unit's sum of g * x / rms(x)."""

    @staticmethod
    def forward(ctx, output, x, weight_probe, squares, member, eps):
        ctx.save_for_backward(x, member)
        ctx.eps = eps
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        x, member = ctx.saved_tensors
        xn = _rms_normalize(x, ctx.eps).reshape(-1, x.shape[-1])
        gw = member @ (grad.reshape(-1, grad.shape[-1]) * xn).to(member.dtype)
        return grad, None, gw, _squares(gw), None, None


class PerUnitGradients:
    """Attach to a model; then a backward pass inside `units(batch)` leaves per-unit
    gradients.

    Usage per micro-batch (a `TokenBatch` with `unit_tokens`/`unit_labels`)::

        with clipper.units(batch):
            losses = ...                 # forward, with sink=clipper.head_sink
            losses.sum().backward()      # the SUM of the units' losses
        clipper.clip_and_accumulate(max_norm)
    """

    def __init__(self, model: nn.Module, ghost: bool = False):
        self.params = [p for p in model.parameters() if p.requires_grad]
        # With compiled layers (train.compile), make dynamo check each module's hooks
        # before reusing a graph, so no graph traced without these hooks runs with them
        # attached (by default it does not check: `models.compile_layers`).
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        # The probes ride on the modules (`privdpo_probes`), their first dimension the unit
        # count of a micro-batch: dynamic, or each count would compile the layer anew.
        torch._dynamo.config.force_nn_module_property_static_shapes = False
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings()
        trainable_head = any(p.requires_grad for p in head.parameters())
        if trainable_head and type(head) is not nn.Linear:
            raise UserError(
                f"differential privacy: the output layer is a {type(head).__name__} (LoRA on"
                " lm_head?); per-unit gradients need a plain Linear head. Drop lm_head from"
                " model.lora.target_modules"
            )
        vocabulary = {id(p) for m in (head, embedding) for p in m.parameters() if p.requires_grad}
        owned: set[int] = set(vocabulary)
        self.handles = []
        # (module, its parameters with per-unit gradients, None where frozen): Linear and
        # RMSNorm layers, whose probes ride on the module as `privdpo_probes` in `units`
        # (read through the module, so identical decoder layers share one compiled graph)
        self.layers: list[tuple[nn.Module, tuple[nn.Parameter | None, ...]]] = []
        unsupported = []
        for name, module in model.named_modules():
            mine = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not mine or module is head:  # the head's gradients come from its sink
                continue
            if module is embedding:
                self.handles.append(module.register_forward_hook(self._embedding_hook))
                continue
            if isinstance(module, nn.Linear):
                probed = (module.weight, module.bias)
            elif _is_rmsnorm(module):
                _check_rmsnorm(module)
                probed = (module.weight,)
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            probed = tuple(p if p is not None and p.requires_grad else None for p in probed)
            if any(p is not None and id(p) in owned for p in probed):
                unsupported.append(f"{name} (a parameter shared with another layer)")
                continue
            owned.update(id(p) for p in probed if p is not None)
            self.layers.append((module, probed))
            self.handles.append(module.register_forward_hook(self._layer_hook))
        missing = [p for p in self.params if id(p) not in owned]
        if unsupported or missing:
            raise UserError(
                "differential privacy: per-unit gradients are not supported for the trainable"
                f" layers {unsupported or '(parameters outside any supported module)'};"
                " supported are Linear, Embedding and RMSNorm. Use LoRA (model.lora.enabled)"
                " or freeze these layers"
            )
        self.head = head if trainable_head else None
        self.embedding = embedding if id(embedding.weight) in owned else None
        self.ghost = ghost
        self.ghost_params: set[int] = set()
        if ghost:
            self.ghost_params = {id(m.weight) for m in (self.embedding, self.head) if m}
        # The vocabulary layers' parameters (the head's, the embedding's), not ghost: their
        # per-unit gradients are written by sinks into [U, width] buffers (one per
        # parameter, shared by the tied head and embedding), normed after the backward.
        self.vocabulary_params = [
            p for p in self.params if id(p) in vocabulary and id(p) not in self.ghost_params
        ]
        self.dtypes = sorted({p.dtype for p in self.params}, key=str)
        self.units_now: _Units | None = None
        self.squares: torch.Tensor | None = None  # [U] its gradient: the layers' squares
        self._vocabulary: dict[int, torch.Tensor] = {}  # id(param) -> [U, width] buffer
        self._recorded = False  # whether a sink ran inside `units`
        self._sums: dict[int, torch.Tensor] = {}  # id(param) -> [1, n] clipped sum so far, fp32
        # unit count -> each layer's probes: made once per count (a Poisson batch has a few
        # dozen), not for every micro-batch (about 300 tensors, 4 ms of host time a step)
        self._probes: dict[int, list[tuple[torch.Tensor | None, ...]]] = {}
        self._ghost_embeddings: dict[int, _GhostEmbedding] = {}
        self._ghost_heads: dict[int, _GhostHead] = {}

    @property
    def head_sink(self) -> _HeadSink | None:
        """What `logprobs.sequence_logps(..., sink=)` needs: the trainable head's sink."""
        return _HeadSink(self, self.head) if self.head is not None else None

    @contextmanager
    def units(self, batch):
        """Record per-unit gradients of the forward and backward passes run inside, for
        `batch` (its host copy: the unit offsets and, for ghost clipping, the input ids).

        Inside, the trainable parameters are switched to requires_grad=False, so autograd
        computes only the gradients flowing back through the layers, not the weight
        gradients: each layer's per-unit gradients are the gradients of its zero probes
        instead, and autograd's batch sums would be thrown away (a third of a full
        fine-tuning backward pass)."""
        if batch.unit_tokens is None:
            raise ValueError("a private micro-batch needs unit offsets (item_unit)")
        device = self.params[0].device
        units = self.units_now = _Units(batch, device, self.dtypes)
        self.squares = torch.zeros(units.count, device=device, requires_grad=True)
        probes = self._probes.get(units.count)
        if probes is None:
            probes = self._probes[units.count] = [
                tuple(_probe(p, units.count) for p in probed) for _, probed in self.layers
            ]
        self._drop_probe_grads(units.count)  # a micro-batch cut short by an error left some
        for (module, _), mine in zip(self.layers, probes, strict=True):
            module.privdpo_probes = mine
        self._vocabulary, self._recorded = {}, False
        self._ghost_embeddings, self._ghost_heads = {}, {}
        if self.ghost:
            emb = None
            if self.embedding is not None:
                weight = self.embedding.weight
                emb = _GhostEmbedding(batch.input_ids, units, weight.shape[0])
                self._ghost_embeddings[id(weight)] = emb
            if self.head is not None:
                tied = self.embedding is not None and self.head.weight is self.embedding.weight
                self._ghost_heads[id(self.head.weight)] = _GhostHead(
                    units, device, emb if tied else None
                )
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        for module, _ in self.layers:
            module.__dict__.pop("privdpo_probes", None)
        self._probes = {}

    def _drop_probe_grads(self, count: int) -> None:
        """Free the per-unit gradients held by the probes of `count` units."""
        for mine in self._probes.get(count, ()):
            for probe in mine:
                if probe is not None:
                    probe.grad = None

    def per_unit(self) -> dict[int, torch.Tensor]:
        """The per-unit gradients recorded so far in `units` ([U, *shape] by id of
        parameter; a layer that has not run, and the ghost parameters, have none)."""
        out = {}
        for module, probed in self.layers:
            probes = getattr(module, "privdpo_probes", None) or [None] * len(probed)
            for p, probe in zip(probed, probes, strict=True):
                if probe is not None and probe.grad is not None:
                    out[id(p)] = probe.grad
        for p in self.vocabulary_params:
            if id(p) in self._vocabulary:
                out[id(p)] = self._vocabulary[id(p)][:, : p.numel()].view(-1, *p.shape)
        return out

    def _vocabulary_sample(self, param: nn.Parameter) -> torch.Tensor:
        """`param`'s [U, *shape] per-unit gradient (the head's or the embedding's), a view
        of a [U, width] buffer zeroed on first use (width rounded up to `NORM_CHUNK`)."""
        count = self.units_now.count
        flat = self._vocabulary.get(id(param))
        if flat is None:
            width = -(-param.numel() // NORM_CHUNK) * NORM_CHUNK  # a zero tail
            flat = torch.zeros((count, width), dtype=param.dtype, device=param.device)
            self._vocabulary[id(param)] = flat
        return flat[:, : param.numel()].view(count, *param.shape)

    # ---- hooks ------------------------------------------------------------------------
    def _layer_hook(self, module, inputs, output):
        """Route a Linear's or RMSNorm's output through its per-unit gradient function."""
        units = self.units_now
        probes = getattr(module, "privdpo_probes", None)
        if not torch.is_grad_enabled() or units is None or probes is None:
            return None
        x = inputs[0].detach()
        member = units.membership(output.dtype)
        if len(probes) == 2:
            mask = units.padding_mask(x.dtype)
            weight, bias = probes
            return _LinearGrads.apply(
                output, x, weight, bias, self.squares, units.padded_index, mask, member
            )
        return _NormGrads.apply(output, x, probes[0], self.squares, member, _rms_eps(module))

    def _embedding_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or self.units_now is None:
            return None
        output = output.detach().requires_grad_()  # the graph starts here
        return _Tap.apply(output, inputs[0].detach(), partial(self._embedding_rows, module))

    def _embedding_rows(self, module, ids: torch.Tensor, g: torch.Tensor) -> None:
        """Each token's output gradient, added into row `id` of its unit's gradient (the
        tied head's per-unit gradient shares the buffer), or into the ghost rows."""
        self._recorded = True
        g2 = g.reshape(-1, g.shape[-1])
        ghost = self._ghost_embeddings.get(id(module.weight))
        if ghost is not None:
            ghost.add(g2)
        else:
            sample = self._vocabulary_sample(module.weight)
            sample.index_put_((self.units_now.token_unit(), ids.reshape(-1)), g2, accumulate=True)

    def _head_tile(self, head: nn.Linear, v0: int, v1: int, d: torch.Tensor, h: torch.Tensor):
        """Vocabulary columns v0..v1 of the head: d [N, v1 - v0] logits gradient of every
        label token, h [N, H] their hidden states."""
        self._recorded = True
        ghost = self._ghost_heads.get(id(head.weight))
        ranges = self.units_now.label_ranges()
        if ghost is not None:
            ghost.add(v0, v1, d, h)
        else:
            out = self._vocabulary_sample(head.weight)
            for u, (a, b) in enumerate(ranges):
                if a < b:
                    out[u, v0:v1].addmm_(d[a:b].t(), h[a:b])
        if head.bias is not None:
            out = self._vocabulary_sample(head.bias)
            for u, (a, b) in enumerate(ranges):
                out[u, v0:v1] += d[a:b].sum(0)

    # ---- clipping ---------------------------------------------------------------------
    def _ghost_squared_norms(self, key: int) -> torch.Tensor:
        """[U] squared norm of the ghost parameter `key`'s per-unit gradients."""
        u = self.units_now.count
        device = self.params[0].device
        total = torch.zeros(u, dtype=torch.float32, device=device)
        emb = self._ghost_embeddings.get(key)
        head = self._ghost_heads.get(key)
        if emb is not None and emb.rows is not None:
            total.index_add_(0, emb.row_unit, emb.rows.square().sum(1))
        if head is not None and head.gram is not None:
            total += head.gram
            if head.embedding is not None and head.cross_rows is not None and emb.rows is not None:
                cross = (emb.rows * head.cross_rows).sum(1)
                total.index_add_(0, emb.row_unit, 2 * cross)
        return total.clamp(min=0)

    def unit_norms(self) -> torch.Tensor:
        """[U] L2 norm of each unit's gradient over all trainable parameters, in float32
        whatever the parameters' dtype."""
        squares = self.squares.grad
        if squares is None and not self._recorded:
            raise RuntimeError("no per-unit gradient was recorded; was backward called?")
        total = torch.zeros_like(self.squares) if squares is None else squares.clone()
        for flat in self._vocabulary.values():  # in chunks: one long fp32 sum drifts
            chunks = flat.view(flat.shape[0], -1, NORM_CHUNK)
            total += torch.linalg.vector_norm(chunks, dim=2, dtype=torch.float32).square().sum(1)
        for p in self.params:
            if id(p) in self.ghost_params:
                sq = self._ghost_squared_norms(id(p))
                if p.dtype in (torch.float16, torch.bfloat16):
                    sq = sq * HALF_GHOST_MARGIN**2
                total += sq
        return total.sqrt()

    @torch.no_grad()
    def clip_and_accumulate(self, max_norm: float) -> torch.Tensor:
        """Add sum_u min(1, C / ||g_u||) g_u of this micro-batch to the running clipped sum
        (float32); return the unit norms [U]."""
        norms = self.unit_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        weights = {d: _round_down(scale, d).unsqueeze(0) for d in self.dtypes}
        for key, g in self.per_unit().items():  # one product per parameter: [1, U] @ [U, n]
            flat = g.reshape(g.shape[0], -1)  # a view (a vocabulary buffer's, strided)
            self._sums[key] = _weighted_sum(weights[g.dtype], flat, self._sums.get(key))
        for p in self.params:
            if id(p) in self.ghost_params:
                part = self._ghost_clipped_sum(p, scale).view(1, -1)
                old = self._sums.get(id(p))
                self._sums[id(p)] = part if old is None else old.add_(part)
        self._drop_probe_grads(self.units_now.count)  # the per-unit gradients' memory
        for module, _ in self.layers:
            module.privdpo_probes = None
        self._vocabulary, self.squares = {}, None
        self._ghost_embeddings, self._ghost_heads = {}, {}
        self.units_now = None
        return norms

    def _ghost_clipped_sum(self, p: nn.Parameter, scale: torch.Tensor) -> torch.Tensor:
        """The second pass: sum_u scale_u g_u for a ghost parameter, float32. The head's
        part recomputes each tile's logits gradient with every token's upstream gradient
        scaled by its unit's clip factor (the gradient is linear in it)."""
        out = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        emb = self._ghost_embeddings.get(id(p))
        if emb is not None and emb.rows is not None:
            out.index_add_(0, emb.row_id, emb.rows * scale[emb.row_unit, None])
        head = self._ghost_heads.get(id(p))
        if head is not None and head.kept is not None:
            hidden, target, lse, grad = head.kept
            scaled = grad * scale[self.units_now.label_unit()]
            for v0, v1 in vocab_tiles(p.shape[0], hidden.shape[0]):
                logits = tile_logits(hidden, p, self.head.bias, v0, v1)
                d = tile_grad(logits, lse, target, scaled, v0, p.dtype)
                add_product(out[v0:v1], d.t(), hidden)
        return out

    def take_clipped_sum(self) -> dict[int, torch.Tensor]:
        """The clipped sum over every micro-batch since the last call (float32, by id of
        parameter; a parameter no unit touched gets zeros), and reset it."""
        out = {}
        for p in self.params:
            flat = self._sums.get(id(p))
            out[id(p)] = (
                torch.zeros_like(p, dtype=torch.float32) if flat is None else flat.view(p.shape)
            )
        self._sums = {}
        return out


def _probe(param: nn.Parameter | None, count: int) -> torch.Tensor | None:
    """A zero [count, *param.shape] input whose gradient will be the per-unit gradients
    of `param`: one element of memory, all its strides 0, so it takes no memory until the
    backward pass. That element is zeroed through a one-element view: `zero_` on the
    probe itself writes it once per position of the shape (on a GPU, 7 ms of a full
    fine-tuning step in job 17)."""
    if param is None:
        return None
    shape = (count, *param.shape)
    probe = torch.empty_strided(shape, (0,) * len(shape), dtype=param.dtype, device=param.device)
    probe.as_strided((1,), (1,)).zero_()
    return probe.requires_grad_()


def _weighted_sum(w: torch.Tensor, g: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """`into` + w @ g ([1, U] @ [U, n]) in float32, `into` updated in place (a new [1, n]
    when None). On a GPU half-precision products are accumulated and written in float32 by
    the one cuBLAS call (exact products of the bf16 clip factors and gradients, a float32
    sum: no bf16 rounding of the sum, no cast and add after it)."""
    if into is not None:
        add_product(into, w, g)
        return into
    if g.is_cuda and g.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(w, g, out_dtype=torch.float32)
    return torch.mm(w, g).float()


def _round_down(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, never above its float32 value: a bfloat16 clip factor rounded up
    (by up to 2^-9) would let a unit's clipped gradient exceed C."""
    if dtype == torch.float32:
        return scale
    if dtype in (torch.float16, torch.bfloat16):
        return (scale * (1 - 2.0**-7)).to(dtype)
    return scale.to(dtype)
