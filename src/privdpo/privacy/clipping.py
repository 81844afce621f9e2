"""Per-unit gradient clipping for DP-SGD, with per-layer gradient samplers.

A *unit* is a group of batch rows whose gradients are added before clipping: one row for an
SFT example, two rows (chosen and rejected) for a DPO pair, all of a user's rows at the user
level. No library offers that grouping (Opacus clips per batch row), so the samplers here
take a `row_unit` map and sum each unit's rows before taking norms.

How: a forward hook on each module with trainable parameters keeps its input, and a hook
on its output's gradient computes, during the backward pass, each unit's gradient for that
module's parameters (autograd's own batch-summed weight gradients are switched off, as they
would be thrown away). After the backward pass every unit's gradient norm over all
parameters is known (in float32); each unit is scaled by min(1, C / norm) and the scaled
gradients are summed with one matrix product per parameter. One forward and one backward
pass, as without privacy.

Supported modules (the layers of Llama/Qwen-style models and of LoRA adapters):
`nn.Linear` (weight and bias), `nn.Embedding` and RMSNorm layers (a `weight` scaling the
root-mean-square-normalized input, checked numerically when attached). A parameter shared
by two modules (tied input and output embeddings) gets the sum of both contributions. Any
other module with a trainable parameter is refused before training starts, because its
gradient would escape clipping and void the guarantee.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from privdpo.errors import UserError


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


class PerUnitGradients:
    """Attach to a model; then a backward pass inside `units(...)` leaves per-unit gradients.

    Usage per micro-batch::

        with clipper.units(row_unit, num_units):
            losses = ...                 # forward
            losses.sum().backward()      # the SUM of the units' losses
        clipper.clip_and_accumulate(max_norm)
    """

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
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
        self.row_unit: torch.Tensor | None = None
        self.num_units = 0
        self.fold_k: int | None = None
        self.samples: dict[int, torch.Tensor] = {}  # id(param) -> [U, *param.shape]
        self.clipped_sum: dict[int, torch.Tensor] = {}  # id(param) -> param.shape, fp32

    @contextmanager
    def units(self, row_unit: torch.Tensor, num_units: int):
        """Record per-unit gradients of the forward and backward passes run inside;
        `row_unit[i]` is the unit of batch row i, in 0..num_units-1.

        Inside, the trainable parameters are switched to requires_grad=False, so autograd
        computes only the gradients flowing back through the layers, not the weight
        gradients: the hooks compute those per unit instead, and autograd's batch sums
        would be thrown away (a third of a full fine-tuning backward pass). A module whose
        output would then need no gradient (the embedding, a LoRA adapter's first matrix)
        has its output marked as requiring one, so the backward pass reaches it."""
        self.row_unit = row_unit
        self.num_units = num_units
        self.samples = {}
        n = len(row_unit)
        k = n // num_units if num_units and n % num_units == 0 else 0
        blocks = torch.arange(num_units).repeat(k) if k else None
        self.fold_k = k if blocks is not None and torch.equal(row_unit.cpu(), blocks) else None
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in self.params:
                p.requires_grad_(True)
            self.row_unit = None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()

    # ---- hooks ------------------------------------------------------------------------
    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or self.row_unit is None:
            return None
        if not output.requires_grad:  # nothing before it is trainable: start the graph here
            output = output.detach().requires_grad_()
        x = inputs[0].detach()
        output.register_hook(lambda g, m=module, x=x: self._per_unit(m, x, g.detach()))
        return output

    def _per_unit(self, module, x: torch.Tensor, g: torch.Tensor) -> None:
        # Tokens are flattened into one axis per row: [N, T, features].
        n = g.shape[0]
        g3 = g.reshape(n, -1, g.shape[-1])
        if isinstance(module, nn.Linear):
            if id(module.weight) in self.owned:
                self._store(module.weight, self._unit_outer(g3, x.reshape(n, -1, x.shape[-1])))
            if module.bias is not None and id(module.bias) in self.owned:
                self._store(module.bias, self._rows_to_units(g3.sum(1)))
        elif isinstance(module, nn.Embedding):
            self._embedding(module.weight, x.reshape(n, -1), g3)
        else:  # RMSNorm
            x3 = _rms_normalize(module, x).reshape(n, -1, x.shape[-1])
            self._store(module.weight, self._rows_to_units((g3 * x3).sum(1)))

    def _unit_outer(self, g3: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """[U, out, in]: sum over each unit's rows and tokens of g x^T (a Linear weight's
        gradient). When the rows are k blocks of units 0..U-1 (SFT: k = 1; DPO: chosen rows
        then rejected rows, k = 2), one batched matmul per block accumulates straight into
        the units, with no per-row tensor. Otherwise per-row gradients are summed."""
        u = self.num_units
        if self.fold_k is None:
            return self._rows_to_units(torch.bmm(g3.transpose(1, 2), x3))
        out = torch.bmm(g3[:u].transpose(1, 2), x3[:u])
        for b in range(1, self.fold_k):
            rows = slice(b * u, (b + 1) * u)
            out.baddbmm_(g3[rows].transpose(1, 2), x3[rows])
        return out

    def _rows_to_units(self, per_row: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(
            (self.num_units, *per_row.shape[1:]), dtype=per_row.dtype, device=per_row.device
        )
        return out.index_add_(0, self.row_unit.to(per_row.device), per_row)

    def _embedding(self, weight: nn.Parameter, ids: torch.Tensor, g3: torch.Tensor) -> None:
        """Scatter each token's output gradient into row `id` of its unit's gradient, in
        place into the tied output layer's per-unit gradient when there is one."""
        vocab, dim = weight.shape
        key = id(weight)
        if key not in self.samples:
            self.samples[key] = torch.zeros(
                (self.num_units, vocab, dim), dtype=g3.dtype, device=g3.device
            )
        unit = self.row_unit.to(ids.device).view(-1, 1)
        flat = (unit * vocab + ids).flatten()
        self.samples[key].view(-1, dim).index_add_(0, flat, g3.reshape(-1, dim))

    def _store(self, param: nn.Parameter, per_unit: torch.Tensor) -> None:
        key = id(param)
        if key in self.samples:
            self.samples[key].add_(per_unit)  # a tied parameter's second module
        else:
            self.samples[key] = per_unit

    # ---- clipping ---------------------------------------------------------------------
    def unit_norms(self) -> torch.Tensor:
        """[U] L2 norm of each unit's gradient over all trainable parameters, in float32
        whatever the parameters' dtype."""
        total = None
        for p in self.params:
            s = self.samples.get(id(p))
            if s is None:
                continue
            sq = torch.linalg.vector_norm(s.flatten(1), dim=1, dtype=torch.float32).square()
            total = sq if total is None else total + sq
        if total is None:
            raise RuntimeError("no per-unit gradient was recorded; was backward called?")
        return total.sqrt()

    @torch.no_grad()
    def clip_and_accumulate(self, max_norm: float) -> torch.Tensor:
        """Add sum_u min(1, C / ||g_u||) g_u of this micro-batch to the running clipped sum
        (float32); return the unit norms [U]."""
        norms = self.unit_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            s = self.samples.get(id(p))
            if s is None:
                continue
            weights = _round_down(scale, s.dtype).unsqueeze(0)
            clipped = torch.mm(weights, s.view(len(scale), -1)).view(p.shape).float()
            key = id(p)
            self.clipped_sum[key] = (
                self.clipped_sum[key] + clipped if key in self.clipped_sum else clipped
            )
        self.samples = {}
        return norms

    def take_clipped_sum(self) -> dict[int, torch.Tensor]:
        """The clipped sum over every micro-batch since the last call (float32, by id of
        parameter; a parameter no unit touched gets zeros), and reset it."""
        out = {
            id(p): self.clipped_sum.get(id(p), torch.zeros_like(p, dtype=torch.float32))
            for p in self.params
        }
        self.clipped_sum = {}
        return out


def _round_down(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, never above its float32 value: a bfloat16 clip factor rounded up
    (by up to 2^-9) would let a unit's clipped gradient exceed C."""
    if dtype == torch.float32:
        return scale
    if dtype in (torch.float16, torch.bfloat16):
        return (scale * (1 - 2.0**-7)).to(dtype)
    return scale.to(dtype)
