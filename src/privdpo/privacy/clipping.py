"""Per-unit gradient clipping for DP-SGD, with per-layer gradient samplers.

A *unit* is a group of batch rows whose gradients are added before clipping: one row for an
SFT example, two rows (chosen and rejected) for a DPO pair, all of a user's rows at the user
level. No library offers that grouping (Opacus clips per batch row), so the samplers here
take a `row_unit` map and sum each unit's rows before taking norms.

How: a forward hook on each module with trainable parameters keeps its input, and a hook
on its output's gradient computes, during the ordinary backward pass, each unit's gradient
for that module's parameters. After the backward pass every unit's gradient norm over all
parameters is known; each unit is scaled by min(1, C / norm) and the scaled gradients are
summed into `param.grad`. One forward and one backward pass, as without privacy.

Supported modules (the layers of Llama/Qwen-style models and of LoRA adapters):
`nn.Linear` (weight and bias), `nn.Embedding` and RMSNorm layers (a `weight` scaling the
root-mean-square-normalized input, checked numerically when attached). A parameter shared
by two modules (tied input and output embeddings) gets the sum of both contributions. Any
other module with a trainable parameter is refused before training starts, because its
gradient would escape clipping and void the guarantee.
"""

from __future__ import annotations

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
    """Attach to a model; then each backward pass leaves per-unit gradients behind.

    Usage per micro-batch: `set_units(row_unit, num_units)`, forward, `loss.backward()` on
    the SUM of the units' losses, then `clip_and_accumulate(max_norm)`.
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
        self.row_unit: torch.Tensor | None = None
        self.num_units = 0
        self.fold_k: int | None = None
        self.samples: dict[int, torch.Tensor] = {}  # id(param) -> [U, *param.shape]
        self.clipped_sum: dict[int, torch.Tensor] = {}  # id(param) -> param.shape, fp32

    def set_units(self, row_unit: torch.Tensor, num_units: int) -> None:
        """`row_unit[i]` is the unit of batch row i, in 0..num_units-1."""
        self.row_unit = row_unit
        self.num_units = num_units
        self.samples = {}
        n = len(row_unit)
        k = n // num_units if num_units and n % num_units == 0 else 0
        blocks = torch.arange(num_units).repeat(k) if k else None
        self.fold_k = k if blocks is not None and torch.equal(row_unit.cpu(), blocks) else None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()

    # ---- hooks ------------------------------------------------------------------------
    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or self.row_unit is None or not output.requires_grad:
            return
        x = inputs[0].detach()
        output.register_hook(lambda g, m=module, x=x: self._per_unit(m, x, g.detach()))

    def _store(self, param: nn.Parameter, per_unit: torch.Tensor) -> None:
        key = id(param)
        if key in self.samples:
            self.samples[key].add_(per_unit)  # a tied parameter's second module
        else:
            self.samples[key] = per_unit.float()

    def _fold(self, t: torch.Tensor) -> torch.Tensor | None:
        """[N, T, F] rows -> [U, k*T, F] units when the rows are k blocks of units 0..U-1
        (an SFT batch: k = 1; DPO: chosen rows then rejected rows, k = 2). Summing a
        unit's tokens then gives its gradient with no per-row tensor. None otherwise."""
        if self.fold_k is None:
            return None
        n, steps, f = t.shape
        k, u = self.fold_k, self.num_units
        return t.view(k, u, steps, f).transpose(0, 1).reshape(u, k * steps, f)

    def _per_unit(self, module, x: torch.Tensor, g: torch.Tensor) -> None:
        # Tokens are flattened into one axis per row: [N, T, features].
        n = g.shape[0]
        g3 = g.reshape(n, -1, g.shape[-1])
        if isinstance(module, nn.Linear):
            x3 = x.reshape(n, -1, x.shape[-1])
            gu, xu = self._fold(g3), self._fold(x3)
            if gu is None:  # rows of uneven units: per-row gradients, then summed per unit
                gu, xu = g3, x3
            if module.weight.requires_grad:
                self._store(module.weight, self._to_units(torch.einsum("nto,nti->noi", gu, xu), gu))
            if module.bias is not None and module.bias.requires_grad:
                self._store(module.bias, self._to_units(gu.sum(1), gu))
        elif isinstance(module, nn.Embedding):
            ids = x.reshape(n, -1, 1)
            gu, iu = self._fold(g3), self._fold(ids)
            if gu is None:
                gu, iu = g3, ids
            per = torch.zeros(
                (gu.shape[0], module.num_embeddings, gu.shape[-1]), dtype=gu.dtype, device=gu.device
            )
            per.scatter_add_(1, iu.expand(-1, -1, gu.shape[-1]), gu)
            self._store(module.weight, self._to_units(per, gu))
        else:  # RMSNorm
            x3 = _rms_normalize(module, x).reshape(n, -1, x.shape[-1])
            self._store(module.weight, self._to_units((g3 * x3).sum(1), g3, folded=False))

    def _to_units(self, t: torch.Tensor, source: torch.Tensor, folded: bool | None = None):
        """`t` per unit already (folded inputs) or per row (summed into units here)."""
        if folded is None:
            folded = source.shape[0] == self.num_units and self.fold_k is not None
        if folded:
            return t
        per_unit = torch.zeros((self.num_units, *t.shape[1:]), dtype=torch.float32, device=t.device)
        return per_unit.index_add_(0, self.row_unit.to(t.device), t.float())

    # ---- clipping ---------------------------------------------------------------------
    def unit_norms(self) -> torch.Tensor:
        """[U] L2 norm of each unit's gradient over all trainable parameters."""
        total = None
        for p in self.params:
            s = self.samples.get(id(p))
            if s is None:
                continue
            sq = s.flatten(1).pow(2).sum(1)
            total = sq if total is None else total + sq
        if total is None:
            raise RuntimeError("no per-unit gradient was recorded; was backward called?")
        return total.sqrt()

    @torch.no_grad()
    def clip_and_accumulate(self, max_norm: float) -> torch.Tensor:
        """Add sum_u min(1, C / ||g_u||) g_u of this micro-batch to the running clipped sum;
        return the unit norms [U]. The unclipped `.grad` autograd also wrote is dropped."""
        norms = self.unit_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = None
            s = self.samples.get(id(p))
            if s is None:
                continue
            clipped = torch.einsum("u,u...->...", scale, s)
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
