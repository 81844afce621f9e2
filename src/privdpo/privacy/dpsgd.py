"""DP-SGD as named steps: sample, clip (per unit), accumulate, add noise, scale.

Abadi et al. 2016, with Poisson sampling of units at rate q (each unit independently in
each logical batch), per-unit clipping to norm C, one Gaussian draw N(0, sigma^2 C^2) per
parameter coordinate per logical step, and division by the *expected* batch size q*N (a
constant, so the sensitivity stays C / (q N)). A logical batch is processed in physical
micro-batches: clipping is per unit and the clipped sums add up, so micro-batching does
not change the result. The guarantee is for add/remove of one unit.
"""

from __future__ import annotations

import json
import math
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from privdpo.config import PrivacyConfig
from privdpo.errors import UserError
from privdpo.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon,
    max_steps_within,
)
from privdpo.privacy.clipping import PerUnitGradients

ALGORITHM = (
    "DP-SGD (Abadi et al. 2016): Poisson sampling of units, per-unit gradient clipping,"
    " Gaussian noise added once per step"
)


@dataclass
class PrivacyPlan:
    """The numbers fixed before training."""

    unit: str
    num_units: int
    sampling_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float  # at the planned number of steps
    target_epsilon: float | None

    def table(self) -> str:
        rows = [
            ("unit", self.unit),
            ("units (N)", self.num_units),
            ("sampling rate q", f"{self.sampling_rate:.6g}"),
            ("expected batch q*N", f"{self.sampling_rate * self.num_units:.4g}"),
            ("steps", self.steps),
            ("noise multiplier sigma", f"{self.noise_multiplier:.6g}"),
            ("clipping norm C", self.max_grad_norm),
            ("epsilon", f"{self.epsilon:.6g}"),
            ("delta", f"{self.delta:.3g}"),
            ("accountant", self.accountant),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def make_plan(cfg: PrivacyConfig, unit: str, num_units: int, batch_size: int, steps: int):
    """Sampling rate from the expected batch size; sigma calibrated to the target epsilon
    for the planned steps (or the epsilon of the given sigma)."""
    q = min(1.0, batch_size / num_units)
    delta = cfg.delta if cfg.delta is not None else default_delta(num_units)
    if cfg.delta is not None and cfg.delta >= 1 / num_units:
        raise UserError(
            f"privacy.delta: {cfg.delta} is not below 1/N = {1 / num_units:.3g} for N ="
            f" {num_units} units; such a delta allows leaking a whole unit. Lower it"
        )
    if cfg.noise_multiplier is not None:
        sigma = cfg.noise_multiplier
    else:
        sigma = calibrate_noise(cfg.target_epsilon, delta, q, steps, cfg.accountant)
    eps = epsilon(q, sigma, steps, delta, cfg.accountant)
    return PrivacyPlan(
        unit,
        num_units,
        q,
        steps,
        sigma,
        cfg.max_grad_norm,
        delta,
        cfg.accountant,
        eps,
        cfg.target_epsilon,
    )


class DPSGD:
    """The private part of a training step; the recipe keeps its loop."""

    def __init__(self, model, plan: PrivacyPlan, cfg: PrivacyConfig, seed: int):
        self.plan = plan
        self.secure = cfg.secure_noise
        self.seed = seed
        self.clipper = PerUnitGradients(model)
        self.ledger = PrivacyLedger(unit=plan.unit, delta=plan.delta, accountant=plan.accountant)
        # A run with a target stops before the step that would take it past the target.
        self.budget_steps = (
            max_steps_within(
                plan.target_epsilon,
                plan.delta,
                plan.sampling_rate,
                plan.noise_multiplier,
                plan.accountant,
            )
            if plan.target_epsilon is not None
            else None
        )

    @classmethod
    def from_config(cls, cfg, unit: str, model, num_units: int, steps: int) -> DPSGD | None:
        """The private step a run's config asks for (printing its plan), or None."""
        if not cfg.privacy.enabled:
            return None
        plan = make_plan(cfg.privacy, unit, num_units, cfg.train.batch_size, steps)
        print("differential privacy plan:\n" + plan.table())
        return cls(model, plan, cfg.privacy, cfg.train.seed)

    # ---- sample -----------------------------------------------------------------------
    def sample(self, step: int) -> list[int]:
        """Poisson sampling: each unit joins the logical batch of `step` with probability q,
        independently (seeded by run seed and step, so a resumed run draws the same)."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, step, "sample"))
        keep = torch.rand(self.plan.num_units, generator=gen) < self.plan.sampling_rate
        return keep.nonzero().flatten().tolist()

    # ---- clip and accumulate ------------------------------------------------------------
    @contextmanager
    def micro_batch(self, row_unit: torch.Tensor, num_units: int):
        """Run the micro-batch's forward and `backward()` on the SUM of its unit losses
        inside; on leaving, each unit's gradient is clipped and added to the step's sum."""
        with self.clipper.units(row_unit, num_units):
            yield
        self.clipper.clip_and_accumulate(self.plan.max_grad_norm)

    # ---- noise and scale ----------------------------------------------------------------
    @torch.no_grad()
    def noise_and_scale(self, step: int) -> None:
        """Set each `param.grad` to (clipped sum + N(0, sigma^2 C^2)) / (q N)."""
        sums = self.clipper.take_clipped_sum()
        std = self.plan.noise_multiplier * self.plan.max_grad_norm
        expected_batch = self.plan.sampling_rate * self.plan.num_units
        seed = secrets.randbits(63) if self.secure else hash_seed(self.seed, step, "noise")
        for i, p in enumerate(self.clipper.params):
            total = sums[id(p)]
            if std > 0:
                gen = torch.Generator(device=total.device).manual_seed(seed + i)
                total = total + torch.normal(
                    0.0, std, size=total.shape, generator=gen, device=total.device
                )
            p.grad = (total / expected_batch).to(p.dtype)
        self.ledger.record_step(self.plan.sampling_rate, self.plan.noise_multiplier)

    def out_of_budget(self) -> bool:
        return self.budget_steps is not None and self.ledger.steps >= self.budget_steps

    def budget_message(self) -> str:
        return (
            f"privacy budget: stopping after {self.ledger.steps} steps; one more step would"
            f" take epsilon past privacy.target_epsilon={self.plan.target_epsilon}"
            f" (delta={self.plan.delta:.3g})"
        )

    # ---- statement ----------------------------------------------------------------------
    def statement(self) -> dict:
        eps = self.ledger.epsilon()
        p = self.plan
        return {
            "unit": p.unit,
            "level": f"{p.unit}-level",
            "epsilon": eps,
            "delta": p.delta,
            "algorithm": ALGORITHM,
            "accountant": f"dp-accounting {p.accountant.upper()}",
            "neighbouring": f"add or remove one {p.unit}",
            "sampling": f"Poisson, rate q = {p.sampling_rate:.6g}",
            "sampling_rate": p.sampling_rate,
            "clipping_norm": p.max_grad_norm,
            "noise_multiplier": p.noise_multiplier,
            "steps": self.ledger.steps,
            "dataset_size": p.num_units,
            "secure_noise": self.secure,
            "summary": (
                f"Each {p.unit}'s influence on this model is bounded by (epsilon ="
                f" {eps:.4g}, delta = {p.delta:.3g})-differential privacy, {ALGORITHM},"
                f" accounted with dp-accounting's {p.accountant.upper()} accountant."
            ),
        }


def write_statement(statement: dict, *directories: Path) -> None:
    for d in directories:
        (d / "privacy.json").write_text(json.dumps(statement, indent=2) + "\n", encoding="utf-8")


def hash_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed from (run seed, step, purpose), stable across Python runs."""
    import hashlib

    digest = hashlib.sha256(f"privdpo-{purpose}-{seed}-{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def planned_dp_steps(num_units: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Steps of a DP run: max_steps, or epochs worth of expected batches."""
    if max_steps is not None:
        return max_steps
    return epochs * math.ceil(num_units / batch_size)
