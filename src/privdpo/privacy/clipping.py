"""Per-unit gradient clipping for DP-SGD, with per-layer gradient samplers.

A *unit* is what one privacy unit contributes to a micro-batch: one SFT example, one DPO
pair (its prompt, chosen and rejected tokens), or all of a user's rows at the user level.
In a `TokenBatch` the tokens of a unit are one contiguous range of the flat token axis
(and its label tokens one range of the label axis), whether the batch is packed (several
units in one row, prompts shared) or padded; so each unit's gradient is a sum over a
token range ("segment sums"), never over batch rows. No library offers that grouping
(Opacus clips per batch row).

How: a forward hook on each module with trainable parameters saves its input for the
backward pass (recomputed there under gradient checkpointing), and the backward of that
module's output computes each unit's gradient for the module's parameters (autograd's own
batch-summed weight gradients are switched off, as they would be thrown away). The
language-model head runs inside `logprobs.LabelLogps`, which hands each chunk's logits
gradient to this module's head sink. After the backward pass every unit's gradient norm
over all parameters is known (in float32); each unit is scaled by min(1, C / norm) and
the scaled gradients are summed. One forward and one backward pass, as without privacy.
The per-unit gradients of a group of parameters (one dtype, up to 2^24 values: all of a
LoRA adapter; at full fine-tuning a small decoder layer, or one large matrix) live side
by side in one [units, parameters] buffer, written in place by the hooks, so the norms
and the clipped sum are one kernel each per group instead of a few per parameter (on a
GPU the private step is bound by the host, which launches the kernels). A group's buffer
is allocated when the backward pass first reaches it, so at most one group is held
beyond what per-parameter tensors would hold.

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
by two modules (tied input and output embeddings) gets the sum of both contributions. Any
other module with a trainable parameter is refused before training starts, because its
gradient would escape clipping and void the guarantee.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from privdpo.errors import UserError

# A ghost norm in half precision is computed from rounded values; inflating it by 1/64
# before clipping keeps every clipped unit gradient at or under C despite that rounding.
HALF_GHOST_MARGIN = 1 + 2.0**-6
# A flat buffer's row norm is reduced in chunks of this many columns, then over chunks: one
# float32 reduction over a whole row of a million values drifts by 1e-5 on the CPU.
NORM_CHUNK = 4096
# Parameter values per flat buffer group (times the units, in the parameters' dtype).
GROUP_VALUES = 2**24


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


def _rms_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise UserError(f"{type(module).__name__}: RMSNorm without an epsilon attribute")


def _rms_normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of RMSNorm's weight multiplication, computed as Llama/Qwen do (in fp32)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
    return h.to(x.dtype)


def _check_rmsnorm(module: nn.Module) -> None:
    """Refuse an RMSNorm whose forward is not weight * normalize(x) (e.g. Gemma's 1 + w)."""
    w = module.weight
    x = torch.randn(2, 3, w.shape[-1], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        expected = w * _rms_normalize(module, x)
        got = module(x)
    if not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-4):
        raise UserError(
            f"{type(module).__name__}: this RMSNorm does not compute weight * x / rms(x), so"
            " privdpo cannot compute its per-unit gradients; freeze it or use LoRA"
        )


class _Units:
    """A micro-batch's units: offsets on the token and label axes, and the device index
    tensors derived from them (built once per micro-batch)."""

    def __init__(self, batch, device):
        self.tokens = batch.unit_tokens
        self.labels = batch.unit_labels
        self.count = len(self.tokens) - 1
        self.device = device
        self._token_unit = None
        self._label_unit = None
        self._padded_index = None
        self._padding_mask: dict[torch.dtype, torch.Tensor] = {}  # dtype -> [U, Tmax, 1]
        self._last_input: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # key, x, rows
        self._membership: dict[torch.dtype, torch.Tensor] = {}  # dtype -> [U, tokens]

    def token_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.tokens[:-1], self.tokens[1:], strict=True))

    def label_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.labels[:-1], self.labels[1:], strict=True))

    def padded_index(self) -> torch.Tensor:
        """[U, Tmax] index into the flat token axis: each unit's tokens in one row, padded
        to the longest unit (padding points at the unit's first token), so per-unit
        products are one batched matmul. Its mask of real tokens is kept on the device
        too, as [U, Tmax, 1] bool."""
        if self._padded_index is None:
            ranges = self.token_ranges()
            width = max(b - a for a, b in ranges)
            index = torch.zeros((len(ranges), width), dtype=torch.long)
            mask = torch.zeros((len(ranges), width, 1), dtype=torch.bool)
            for u, (a, b) in enumerate(ranges):
                index[u, : b - a] = torch.arange(a, b)
                index[u, b - a :] = a
                mask[u, : b - a] = True
            self._padded_index = index.to(self.device, non_blocking=True)
            self._padding_mask[torch.bool] = mask.to(self.device, non_blocking=True)
        return self._padded_index

    def padded_inputs(self, x2: torch.Tensor) -> torch.Tensor:
        """[U, Tmax, H] rows of the layer input `x2` [tokens, H] per unit, padding rows
        zero (so the output gradient's padding rows need no mask). Layers that read one
        input, whose hooks run one after the other in the backward pass (q/k/v, gate/up
        at full fine-tuning), share it: the last input is kept, with a reference that
        keeps its storage from being reused, and found again by storage, offset, shape,
        strides and version. Only one is kept, and dropped before the next is gathered,
        so at most one input's rows outlive their layer."""
        key = (
            x2.untyped_storage().data_ptr(),
            x2.storage_offset(),
            tuple(x2.shape),
            x2.stride(),
            x2.dtype,
            x2._version,
        )
        if self._last_input is not None and self._last_input[0] == key:
            return self._last_input[2]
        self._last_input = None
        index = self.padded_index()
        mask = self._padding_mask.get(x2.dtype)
        if mask is None:
            mask = self._padding_mask[x2.dtype] = self._padding_mask[torch.bool].to(x2.dtype)
        rows = x2[index] * mask
        self._last_input = (key, x2, rows)
        return rows

    def token_unit(self) -> torch.Tensor:
        if self._token_unit is None:
            self._token_unit = _unit_index(self.tokens, self.device)
        return self._token_unit

    def label_unit(self) -> torch.Tensor:
        if self._label_unit is None:
            self._label_unit = _unit_index(self.labels, self.device)
        return self._label_unit

    def add_token_sums(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Add into `out` [U, H] each unit's sum of `values` [tokens, H]: one product with
        the [U, tokens] 0/1 membership matrix (the product sums in float32 inside). A
        scatter-add (index_add_) into the buffer's strided view, in bf16 on a GPU, adds
        atomically into the few rows that all the tokens target: in job 6 those adds (norm
        weights and q/k/v biases of Qwen at full fine-tuning) took 335 ms of a 540 ms
        private step."""
        member = self._membership.get(values.dtype)
        if member is None:
            unit = self.token_unit()
            rows = torch.arange(self.count, device=unit.device)
            member = self._membership[values.dtype] = (rows[:, None] == unit).to(values.dtype)
        out.addmm_(member, values)


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
    """The identity on a module's output whose backward hands (the module's input, the
    output's gradient) to `sink`. The input is a tensor saved for backward, not a Python
    reference: under gradient checkpointing it is dropped after the forward pass and
    recomputed with its layer in the backward pass, like every other activation, instead
    of being held for the whole micro-batch."""

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
        # With compiled layers (train.compile: true), make dynamo check each module's hooks
        # before reusing a graph, so no graph traced without these hooks runs with them
        # attached (by default it does not check: `models.compile_layers`).
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        owned: set[int] = set()
        self.handles = []
        unsupported = []
        for name, module in model.named_modules():
            mine = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not mine:
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                pass
            elif _is_rmsnorm(module):
                _check_rmsnorm(module)
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            owned.update(id(p) for p in mine)
            self.handles.append(module.register_forward_hook(self._forward_hook))
        missing = [p for p in self.params if id(p) not in owned]
        if unsupported or missing:
            raise UserError(
                "differential privacy: per-unit gradients are not supported for the trainable"
                f" layers {unsupported or '(parameters outside any supported module)'};"
                " supported are Linear, Embedding and RMSNorm. Use LoRA (model.lora.enabled)"
                " or freeze these layers"
            )
        self.owned = owned
        head = model.get_output_embeddings()
        trainable_head = any(p.requires_grad for p in head.parameters())
        if trainable_head and type(head) is not nn.Linear:
            raise UserError(
                f"differential privacy: the output layer is a {type(head).__name__} (LoRA on"
                " lm_head?); per-unit gradients need a plain Linear head. Drop lm_head from"
                " model.lora.target_modules"
            )
        self.head = head if trainable_head else None
        embedding = model.get_input_embeddings()
        self.embedding = embedding if id(embedding.weight) in owned else None
        self.ghost = ghost
        self.ghost_params: set[int] = set()
        if ghost:
            if self.embedding is not None:
                self.ghost_params.add(id(self.embedding.weight))
            if self.head is not None:
                self.ghost_params.add(id(self.head.weight))
        self.groups = _flat_groups([p for p in self.params if id(p) not in self.ghost_params])
        self.group_of = {id(p): i for i, group in enumerate(self.groups) for p in group}
        self.group_columns = [_offsets(group) for group in self.groups]  # per parameter
        self.units_now: _Units | None = None
        self.samples: dict[int, torch.Tensor] = {}  # id(param) -> [U, *param.shape] view
        self._flat: list[torch.Tensor | None] = []  # group -> [U, width] buffer, once used
        self._flat_sum: list[torch.Tensor | None] = [None] * len(self.groups)  # fp32 [width]
        self._recorded = False  # whether a hook ran inside `units`
        self.clipped_sum: dict[int, torch.Tensor] = {}  # ghost id(param) -> shape, fp32
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
        gradients: the hooks compute those per unit instead, and autograd's batch sums
        would be thrown away (a third of a full fine-tuning backward pass). A module whose
        output would then need no gradient (the embedding, a LoRA adapter's first matrix)
        has its output marked as requiring one, so the backward pass reaches it."""
        if batch.unit_tokens is None:
            raise ValueError("a private micro-batch needs unit offsets (item_unit)")
        device = self.params[0].device
        self.units_now = _Units(batch, device)
        self._start_samples()
        self._ghost_embeddings, self._ghost_heads = {}, {}
        if self.ghost:
            emb = None
            if self.embedding is not None:
                weight = self.embedding.weight
                emb = _GhostEmbedding(batch.input_ids, self.units_now, weight.shape[0])
                self._ghost_embeddings[id(weight)] = emb
            if self.head is not None:
                tied = self.embedding is not None and self.head.weight is self.embedding.weight
                self._ghost_heads[id(self.head.weight)] = _GhostHead(
                    self.units_now, device, emb if tied else None
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

    def _start_samples(self) -> None:
        self.samples, self._recorded = {}, False
        self._flat = [None] * len(self.groups)

    def _sample(self, param: nn.Parameter) -> torch.Tensor:
        """`param`'s [U, *shape] per-unit gradient, a view into its group's buffer (zeroed
        and viewed for every parameter of the group on first use); hooks add into it."""
        view = self.samples.get(id(param))
        if view is None:
            i = self.group_of[id(param)]
            group, columns, count = self.groups[i], self.group_columns[i], self.units_now.count
            width = -(-columns[-1][1] // NORM_CHUNK) * NORM_CHUNK  # a zero tail
            flat = torch.zeros((count, width), dtype=param.dtype, device=param.device)
            self._flat[i] = flat
            for p, (a, b) in zip(group, columns, strict=True):
                self.samples[id(p)] = flat[:, a:b].view(count, *p.shape)
            view = self.samples[id(param)]
        return view

    # ---- hooks ------------------------------------------------------------------------
    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or self.units_now is None:
            return None
        if not output.requires_grad:  # nothing before it is trainable: start the graph here
            output = output.detach().requires_grad_()
        return _Tap.apply(output, inputs[0].detach(), partial(self._per_unit, module))

    def _per_unit(self, module, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add this module's per-unit parameter gradients into their sample views (a
        parameter shared by two modules gets both)."""
        units = self.units_now
        self._recorded = True
        g2 = g.reshape(-1, g.shape[-1])  # the flat token axis
        if isinstance(module, nn.Linear):
            x2 = x.reshape(-1, x.shape[-1])
            if id(module.weight) in self.owned:
                self._unit_outer(g2, x2, units, self._sample(module.weight))
            if module.bias is not None and id(module.bias) in self.owned:
                units.add_token_sums(self._sample(module.bias), g2)
        elif isinstance(module, nn.Embedding):
            ghost = self._ghost_embeddings.get(id(module.weight))
            if ghost is not None and module is self.embedding:
                ghost.add(g2)
            else:
                self._embedding(module.weight, x.reshape(-1), g2)
        else:  # RMSNorm
            xn = _rms_normalize(module, x).reshape(-1, x.shape[-1])
            units.add_token_sums(self._sample(module.weight), g2 * xn)

    def _head_tile(self, head: nn.Linear, v0: int, v1: int, d: torch.Tensor, h: torch.Tensor):
        """Vocabulary columns v0..v1 of the head: d [N, v1 - v0] logits gradient of every
        label token, h [N, H] their hidden states."""
        self._recorded = True
        ghost = self._ghost_heads.get(id(head.weight))
        ranges = self.units_now.label_ranges()
        if ghost is not None:
            ghost.add(v0, v1, d, h)
        elif id(head.weight) in self.owned:
            out = self._sample(head.weight)
            for u, (a, b) in enumerate(ranges):
                if a < b:
                    out[u, v0:v1].addmm_(d[a:b].t(), h[a:b])
        if head.bias is not None and id(head.bias) in self.owned:
            out = self._sample(head.bias)
            for u, (a, b) in enumerate(ranges):
                out[u, v0:v1] += d[a:b].sum(0)

    @staticmethod
    def _unit_outer(g2, x2, units: _Units, out: torch.Tensor, in_place=None) -> None:
        """Add into `out` [U, out, in], for each unit, the sum over its tokens of g x^T (a
        Linear weight's gradient). One unit alone is one matrix product; several are one
        batched product over their padded token rows (the input's padding rows are zero, so
        they add nothing). `in_place` (default: on CUDA, where cuBLAS takes the strided view
        as it is) accumulates in the product; otherwise (the CPU would loop over units
        for a strided result) the product is added after."""
        if units.count == 1:
            out[0].addmm_(g2.t(), x2)
            return
        x3 = units.padded_inputs(x2)  # [U, Tmax, in], padding rows zero
        g3 = g2[units.padded_index()]  # [U, Tmax, out]
        if out.is_cuda if in_place is None else in_place:
            out.baddbmm_(g3.transpose(1, 2), x3)
        else:
            out.add_(torch.bmm(g3.transpose(1, 2), x3))

    def _embedding(self, weight: nn.Parameter, ids: torch.Tensor, g2: torch.Tensor) -> None:
        """Add each token's output gradient into row `id` of its unit's gradient (the
        tied output layer's per-unit gradient shares the view)."""
        self._sample(weight).index_put_((self.units_now.token_unit(), ids), g2, accumulate=True)

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
        if not self._recorded:
            raise RuntimeError("no per-unit gradient was recorded; was backward called?")
        total = None
        for flat in (f for f in self._flat if f is not None):  # untouched groups add 0
            chunks = flat.view(flat.shape[0], -1, NORM_CHUNK)
            sq = torch.linalg.vector_norm(chunks, dim=2, dtype=torch.float32).square().sum(1)
            total = sq if total is None else total + sq
        for p in self.params:
            if id(p) in self.ghost_params:
                sq = self._ghost_squared_norms(id(p))
                if p.dtype in (torch.float16, torch.bfloat16):
                    sq = sq * HALF_GHOST_MARGIN**2
                total = sq if total is None else total + sq
        return total.sqrt()

    @torch.no_grad()
    def clip_and_accumulate(self, max_norm: float) -> torch.Tensor:
        """Add sum_u min(1, C / ||g_u||) g_u of this micro-batch to the running clipped sum
        (float32); return the unit norms [U]."""
        norms = self.unit_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for i, flat in enumerate(self._flat):
            if flat is not None:
                weights = _round_down(scale, flat.dtype).unsqueeze(0)
                clipped = torch.mm(weights, flat).squeeze(0).float()
                total = self._flat_sum[i]
                self._flat_sum[i] = clipped if total is None else total.add_(clipped)
        for p in self.params:
            key = id(p)
            if key in self.ghost_params:
                clipped = self._ghost_clipped_sum(p, scale)
                self.clipped_sum[key] = (
                    self.clipped_sum[key] + clipped if key in self.clipped_sum else clipped
                )
        self.samples, self._flat = {}, []
        self._ghost_embeddings, self._ghost_heads = {}, {}
        self.units_now = None
        return norms

    def _ghost_clipped_sum(self, p: nn.Parameter, scale: torch.Tensor) -> torch.Tensor:
        """The second pass: sum_u scale_u g_u for a ghost parameter, float32. The head's
        part recomputes each tile's logits gradient with every token's upstream gradient
        scaled by its unit's clip factor (the gradient is linear in it)."""
        from privdpo.logprobs import tile_grad, tile_logits, vocab_tiles

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
                out[v0:v1] += torch.mm(d.t(), hidden).float()
        return out

    def take_clipped_sum(self) -> dict[int, torch.Tensor]:
        """The clipped sum over every micro-batch since the last call (float32, by id of
        parameter; a parameter no unit touched gets zeros), and reset it. A parameter's
        sum is a contiguous view of its group's flat sum."""
        out = {}
        for group, columns, flat in zip(
            self.groups, self.group_columns, self._flat_sum, strict=True
        ):
            if flat is None:
                flat = torch.zeros(columns[-1][1], dtype=torch.float32, device=group[0].device)
            for p, (a, b) in zip(group, columns, strict=True):
                out[id(p)] = flat[a:b].view(p.shape)
        for p in self.params:
            if id(p) in self.ghost_params:
                out[id(p)] = self.clipped_sum.get(id(p), torch.zeros_like(p, dtype=torch.float32))
        self.clipped_sum, self._flat_sum = {}, [None] * len(self.groups)
        return out


def _flat_groups(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """`params` in groups of one dtype and at most `GROUP_VALUES` values (a bigger
    parameter alone), in reverse order: the order the backward pass reaches them."""
    groups: list[list[nn.Parameter]] = []
    open_group: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in reversed(params):
        group = open_group.get(p.dtype)
        if group is None or sum(q.numel() for q in group) + p.numel() > GROUP_VALUES:
            group = open_group[p.dtype] = []
            groups.append(group)
        group.append(p)
    return groups


def _offsets(group: list[nn.Parameter]) -> list[tuple[int, int]]:
    """Each parameter's column range in its group's flat buffer."""
    out, offset = [], 0
    for p in group:
        out.append((offset, offset + p.numel()))
        offset += p.numel()
    return out


def _round_down(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, never above its float32 value: a bfloat16 clip factor rounded up
    (by up to 2^-9) would let a unit's clipped gradient exceed C."""
    if dtype == torch.float32:
        return scale
    if dtype in (torch.float16, torch.bfloat16):
        return (scale * (1 - 2.0**-7)).to(dtype)
    return scale.to(dtype)
