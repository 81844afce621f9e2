"""DP-SGD as named steps: sample, clip (per unit), accumulate, add noise, scale.

Abadi et al. 2016, with Poisson sampling of units at rate q (each unit independently in
each logical batch), per-unit clipping to norm C, one Gaussian draw N(0, sigma^2 C^2) per
parameter coordinate per logical step, and division by the *expected* batch size q*N (a
constant, so the sensitivity stays C / (q N)). A logical batch is processed in physical
micro-batches: clipping is per unit and the clipped sums add up, so micro-batching does
not change the result. The guarantee is for add/remove of one unit.

A unit is a group of training items (examples or pairs). At example/pair level each item
is its own unit. At user level (Charles et al. 2024, "Fine-Tuning Large Language Models
with User-Level Differential Privacy") each user first keeps at most k items, then:
- ELS (example-level sampling): items are still sampled and clipped one by one; the
  user-level epsilon accounts for a user's k items (mixture-of-Gaussians PLD);
- ULS (user-level sampling): a unit is all of a user's kept items; users are sampled,
  and a user's gradient is the average of its items' gradients, clipped once.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
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
from privdpo.privacy.user_level import (
    calibrate_els_noise,
    cap_contributions,
    default_bound_els,
    default_bound_uls,
    els_epsilon,
    els_group_epsilon,
    els_max_steps_within,
    units_per_user,
)

ALGORITHM = (
    "DP-SGD (Abadi et al. 2016): Poisson sampling of units, per-unit gradient clipping,"
    " Gaussian noise added once per step"
)
USER_ALGORITHMS = {
    "els": (
        "ELS user-level DP-SGD (Charles et al. 2024): each user capped at k examples/pairs;"
        " Poisson sampling and clipping of examples/pairs; Gaussian noise once per step;"
        " user-level epsilon from the mixture-of-Gaussians PLD of Binomial(k, q)"
        " contributions per step"
    ),
    "uls": (
        "ULS user-level DP-SGD (Charles et al. 2024): each user capped at k examples/pairs;"
        " Poisson sampling of users; each sampled user's gradient is the average over its"
        " examples/pairs, clipped once; Gaussian noise once per step"
    ),
}


@dataclass
class UserBound:
    """What user-level DP's contribution bound did to the training data."""

    algorithm: str  # "els" or "uls"
    bound: int  # k
    chosen_by: str  # how k was chosen
    users: int
    units_kept: int
    units_dropped: int


@dataclass
class PrivacyPlan:
    """The numbers fixed before training."""

    unit: str
    num_units: int  # the units sampled: examples, pairs, or (ULS) users
    sampling_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float  # at the planned number of steps
    target_epsilon: float | None
    users: UserBound | None = None

    @property
    def els_bound(self) -> int | None:
        return self.users.bound if self.users and self.users.algorithm == "els" else None

    def table(self) -> str:
        rows = [("unit", self.unit)]
        uls = self.users is not None and self.users.algorithm == "uls"
        if self.users is not None:
            u = self.users
            rows += [
                ("algorithm", u.algorithm.upper()),
                ("contribution bound k", f"{u.bound} ({u.chosen_by})"),
                ("examples/pairs kept", u.units_kept),
                ("examples/pairs dropped", u.units_dropped),
            ]
            if not uls:
                rows.append(("users", u.users))
        rows += [
            ("users (N)" if uls else "units (N)", self.num_units),
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


def privacy_units(
    cfg, items: list, recipe_unit: str, steps: int
) -> tuple[list, list[list[int]], UserBound | None]:
    """The items a private run trains on and its units, as groups of item indices.

    Example/pair level: every item is its own unit. User level: every item must name its
    user (`user_id`); each user keeps at most k items, a random k of theirs seeded by the
    run's seed; ELS keeps one unit per item, ULS makes each user's kept items one unit.
    `steps`: the run's planned steps (the ULS default k is chosen for them).
    """
    pv = cfg.privacy
    if not pv.enabled or pv.unit != "user":
        return items, [[i] for i in range(len(items))], None
    missing = [it.where for it in items if it.user_id is None]
    if missing:
        raise UserError(
            f"privacy.unit=user needs a user id on every row, but {len(missing)} rows have"
            f" none in column '{cfg.data.user_id_column}' (e.g. {', '.join(missing[:5])}):"
            f" add it, set data.user_id_column to the column that has it, or set"
            f" privacy.unit={recipe_unit}"
        )
    users = [it.user_id for it in items]
    counts = list(units_per_user(users).values())
    if pv.contribution_bound is not None:
        k, chosen_by = pv.contribution_bound, "privacy.contribution_bound"
    elif pv.user_algorithm == "els":
        k, chosen_by = default_bound_els(counts), "default: the median per user"
    else:
        delta = pv.delta if pv.delta is not None else default_delta(len(counts))
        k = default_bound_uls(
            counts,
            cfg.train.batch_size,
            steps,
            pv.target_epsilon,
            delta,
            pv.accountant,
        )
        chosen_by = "default: least predicted noise"
    kept = cap_contributions(users, k, cfg.train.seed)
    kept_items = [items[i] for i in kept]
    bound = UserBound(
        pv.user_algorithm, k, chosen_by, len(counts), len(kept), len(items) - len(kept)
    )
    if pv.user_algorithm == "els":
        return kept_items, [[i] for i in range(len(kept_items))], bound
    by_user: dict[str, list[int]] = {}
    for i, it in enumerate(kept_items):
        by_user.setdefault(it.user_id, []).append(i)
    return kept_items, list(by_user.values()), bound


def make_plan(
    cfg: PrivacyConfig,
    unit: str,
    num_units: int,
    batch_size: int,
    steps: int,
    users: UserBound | None = None,
    num_items: int | None = None,
) -> PrivacyPlan:
    """Sampling rate from the expected batch size (in items); sigma calibrated to the target
    epsilon for the planned steps (or the epsilon of the given sigma).

    ULS samples users at q = batch_size / items kept: a sampled user brings its items, so
    the expected number of items per step is batch_size. Delta is set below 1/N for the N
    protected units (users at user level)."""
    num_items = num_items if num_items is not None else num_units
    q = min(1.0, batch_size / num_items)
    protected = users.users if users is not None else num_units
    delta = cfg.delta if cfg.delta is not None else default_delta(protected)
    if cfg.delta is not None and cfg.delta >= 1 / protected:
        raise UserError(
            f"privacy.delta: {cfg.delta} is not below 1/N = {1 / protected:.3g} for N ="
            f" {protected} {unit}s; such a delta allows leaking a whole {unit}. Lower it"
        )
    k = users.bound if users is not None and users.algorithm == "els" else None
    if cfg.noise_multiplier is not None:
        sigma = cfg.noise_multiplier
    elif k is not None:
        sigma = calibrate_els_noise(cfg.target_epsilon, delta, q, k, steps)
    else:
        sigma = calibrate_noise(cfg.target_epsilon, delta, q, steps, cfg.accountant)
    if k is not None:
        eps = els_epsilon(q, sigma, k, steps, delta)
    else:
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
        users,
    )


def plan_from_config(cfg, groups: list[list[int]], steps: int, users: UserBound | None):
    """The plan of a run config whose units `privacy_units` made."""
    unit = "user" if users is not None else ("pair" if hasattr(cfg, "dpo") else "example")
    num_items = sum(len(g) for g in groups)
    return make_plan(cfg.privacy, unit, len(groups), cfg.train.batch_size, steps, users, num_items)


class DPSGD:
    """The private part of a training step; the recipe keeps its loop."""

    def __init__(self, model, plan: PrivacyPlan, cfg: PrivacyConfig, seed: int, groups):
        self.plan = plan
        self.groups: list[list[int]] = groups  # unit -> its item indices
        self.secure = cfg.secure_noise
        self.seed = seed
        self.clipper = PerUnitGradients(model, ghost=cfg.ghost_clipping)
        self._epsilon_ahead: EpsilonAhead | None = None
        self.ledger = PrivacyLedger(
            unit=plan.unit, delta=plan.delta, accountant=plan.accountant, els_bound=plan.els_bound
        )
        # A run with a target stops before the step that would take it past the target.
        self.budget_steps = None
        if plan.target_epsilon is not None and plan.els_bound is not None:
            self.budget_steps = els_max_steps_within(
                plan.target_epsilon,
                plan.delta,
                plan.sampling_rate,
                plan.noise_multiplier,
                plan.els_bound,
            )
        elif plan.target_epsilon is not None:
            self.budget_steps = max_steps_within(
                plan.target_epsilon,
                plan.delta,
                plan.sampling_rate,
                plan.noise_multiplier,
                plan.accountant,
            )

    @classmethod
    def from_config(
        cls, cfg, model, groups: list[list[int]], steps: int, users: UserBound | None
    ) -> DPSGD | None:
        """The private step of a run's config (printing its plan), or None for a run
        without privacy; `groups` and `users` as `privacy_units` returned them."""
        if not cfg.privacy.enabled:
            return None
        plan = plan_from_config(cfg, groups, steps, users)
        print("differential privacy plan:\n" + plan.table())
        return cls(model, plan, cfg.privacy, cfg.train.seed, groups)

    # ---- sample -----------------------------------------------------------------------
    def sample(self, step: int) -> list[int]:
        """Poisson sampling: each unit joins the logical batch of `step` with probability q,
        independently (seeded by run seed and step, so a resumed run draws the same)."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, step, "sample"))
        keep = torch.rand(self.plan.num_units, generator=gen) < self.plan.sampling_rate
        return keep.nonzero().flatten().tolist()

    def micro_batches(
        self, units: list[int], size: int, max_tokens: int | None = None, tokens_of=None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Pack the sampled units into micro-batches of at most `size` items (and at most
        `max_tokens` tokens, counted by `tokens_of(item index)`); yield (item indices, each
        item's unit within the micro-batch, each item's loss weight).

        A unit is never split, since its clipping needs all its items: a unit over either
        cap gets a micro-batch of its own. The weight is 1 / (items in the unit), so the
        gradient of the weighted loss sum is each unit's average item gradient (ULS); a
        one-item unit has weight 1."""
        items: list[int] = []
        unit_of: list[int] = []
        weights: list[float] = []
        tokens = 0
        for u in units:
            group = self.groups[u]
            group_tokens = sum(tokens_of(i) for i in group) if max_tokens else 0
            full = len(items) + len(group) > size or (
                max_tokens is not None and tokens + group_tokens > max_tokens
            )
            if items and full:
                yield items, torch.tensor(unit_of), torch.tensor(weights)
                items, unit_of, weights, tokens = [], [], [], 0
            n = (unit_of[-1] + 1) if unit_of else 0
            items += group
            unit_of += [n] * len(group)
            weights += [1.0 / len(group)] * len(group)
            tokens += group_tokens
        if items:
            yield items, torch.tensor(unit_of), torch.tensor(weights)

    # ---- clip and accumulate ------------------------------------------------------------
    @contextmanager
    def micro_batch(self, batch):
        """Run the micro-batch's forward and `backward()` on the (weighted) SUM of its item
        losses inside; on leaving, each unit's gradient is clipped and added to the step's
        sum. `batch`: the host `TokenBatch`, built with the micro-batch's item_unit."""
        with self.clipper.units(batch):
            yield
        self.clipper.clip_and_accumulate(self.plan.max_grad_norm)

    @property
    def head_sink(self):
        """Pass to `sequence_logps(..., sink=)` inside `micro_batch`."""
        return self.clipper.head_sink

    # ---- noise and scale ----------------------------------------------------------------
    @torch.no_grad()
    def noise_and_scale(self, step: int) -> None:
        """Set each `param.grad` to (clipped sum + N(0, sigma^2 C^2)) / (q N)."""
        sums = self.clipper.take_clipped_sum()
        std = self.plan.noise_multiplier * self.plan.max_grad_norm
        expected_batch = self.plan.sampling_rate * self.plan.num_units
        seed = secrets.randbits(63) if self.secure else hash_seed(self.seed, step, "noise")
        gen = None
        for p in self.clipper.params:
            total = sums[id(p)]
            if std > 0:
                if gen is None:  # one generator per step, drawn from in parameter order
                    gen = torch.Generator(device=total.device).manual_seed(seed)
                noise = torch.randn(
                    total.shape, generator=gen, device=total.device, dtype=torch.float32
                )
                total = total.add_(noise, alpha=std)
            p.grad = total.div_(expected_batch).to(p.dtype)
        self.ledger.record_step(self.plan.sampling_rate, self.plan.noise_multiplier)

    # ---- epsilon, off the training thread ----------------------------------------------
    def plan_logged_epsilons(self, steps: list[int]) -> None:
        """Start computing, in a background thread, the epsilon after each of `steps` (the
        steps that will be logged): the noise and sampling rate are fixed, so each is known
        before the step runs, and the accountant stays off the training step."""
        q, sigma = self.plan.sampling_rate, self.plan.noise_multiplier
        keys = {
            s: self.ledger.key_after(s - self.ledger.steps, q, sigma)
            for s in steps
            if s > self.ledger.steps
        }
        self._epsilon_ahead = EpsilonAhead(keys, self.ledger.epsilon_of_key)

    def logged_epsilon(self) -> float:
        """The ledger's epsilon now: from the background thread when it is ready."""
        if self._epsilon_ahead is not None:
            return self._epsilon_ahead.get(self.ledger.steps, self.ledger.key())
        return self.ledger.epsilon()

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
        algorithm = USER_ALGORITHMS[p.users.algorithm] if p.users else ALGORITHM
        out = {
            "unit": p.unit,
            "level": f"{p.unit}-level",
            "epsilon": eps,
            "delta": p.delta,
            "algorithm": algorithm,
            "accountant": f"dp-accounting {p.accountant.upper()}",
            "neighbouring": f"add or remove one {p.unit}"
            + (" (with all of their data)" if p.users else ""),
            "sampling": f"Poisson, rate q = {p.sampling_rate:.6g}",
            "sampling_rate": p.sampling_rate,
            "clipping_norm": p.max_grad_norm,
            "noise_multiplier": p.noise_multiplier,
            "steps": self.ledger.steps,
            "dataset_size": p.num_units,
            "secure_noise": self.secure,
        }
        under = ""
        if p.users is not None:
            u = p.users
            out |= {
                "user_algorithm": u.algorithm.upper(),
                "contribution_bound": u.bound,
                "contribution_bound_chosen_by": u.chosen_by,
                "users": u.users,
                "units_kept": u.units_kept,
                "units_dropped": u.units_dropped,
                "sampling": (
                    f"Poisson over {'users' if u.algorithm == 'uls' else 'examples/pairs'},"
                    f" rate q = {p.sampling_rate:.6g}"
                ),
                "dataset_size": u.users,
            }
            if u.algorithm == "els":
                steps = self.ledger.steps  # the loose bound, for comparison only
                out["group_privacy_epsilon"] = (
                    els_group_epsilon(p.sampling_rate, p.noise_multiplier, u.bound, steps, p.delta)
                    if steps
                    else 0.0
                )
            under = f", under {u.algorithm.upper()} with k = {u.bound}"
        out["summary"] = (
            f"Each {p.unit}'s influence on this model is bounded by (epsilon ="
            f" {eps:.4g}, delta = {p.delta:.3g})-differential privacy{under}: {algorithm},"
            f" accounted with dp-accounting's {p.accountant.upper()} accountant."
        )
        return out


class EpsilonAhead:
    """Epsilons of ledger keys (step -> segments), computed in order by a daemon thread.
    `get` returns the computed value when the key matches, and otherwise computes it on
    the calling thread: the number is the same either way (an exact function of the key)."""

    def __init__(self, keys: dict[int, tuple], epsilon_of):
        self.keys = keys
        self.epsilon_of = epsilon_of
        self.values: dict[int, float] = {}
        threading.Thread(target=self._run, daemon=True, name="privdpo-epsilon").start()

    def _run(self) -> None:
        for step, key in sorted(self.keys.items()):
            self.values[step] = self.epsilon_of(key)

    def get(self, step: int, key: tuple) -> float:
        if self.keys.get(step) == key and step in self.values:
            return self.values[step]
        return self.epsilon_of(key)


def write_statement(statement: dict, *directories: Path) -> None:
    for d in directories:
        (d / "privacy.json").write_text(json.dumps(statement, indent=2) + "\n", encoding="utf-8")


def hash_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed from (run seed, step, purpose), stable across Python runs."""
    import hashlib

    digest = hashlib.sha256(f"privdpo-{purpose}-{seed}-{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
