"""Planning a private run: the contribution bound k, the sampling rate and the noise.

User-level DP (Charles et al. 2024, "Fine-Tuning Large Language Models with User-Level
Differential Privacy") caps each user at k units (`contributions.py`), then either
- ELS: samples units and accounts for a user's k of them (`els_accounting.py`), or
- ULS: samples users; a sampled user's gradient is the average of its (at most k) units'
  gradients, clipped once. This is ordinary DP-SGD with the user as the unit, so
  `accounting.epsilon` / `accounting.calibrate_noise` with the user sampling rate apply.

Here: the default k of each algorithm, the ULS prediction of the noise each k needs (the
plan table of `privdpo privacy plan`), and the `PrivacyPlan` of a run: its units, rate,
steps, noise multiplier and planned epsilon, fixed before training.
"""

from __future__ import annotations

import collections
import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from privdpo.config import PrivacyConfig
from privdpo.errors import UserError
from privdpo.privacy import accounting
from privdpo.privacy.accounting import (
    _check_delta,
    _check_positive_steps,
    _check_target_epsilon,
    calibrate_noise,
    default_delta,
    epsilon,
)
from privdpo.privacy.contributions import _check_bound, cap_contributions, units_per_user
from privdpo.privacy.els_accounting import calibrate_els_noise, els_epsilon

USER_ALGORITHMS = ("els", "uls")


# Candidate bounds: powers of two up to the largest count (thinned to at most this many),
# plus the median.
MAX_POWER_CANDIDATES = 10


def _check_counts(counts: Sequence[int]) -> list[int]:
    counts = list(counts)
    if not counts:
        raise ValueError("counts (units per user) must not be empty")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1]
    if bad:
        raise ValueError(
            f"counts (units per user) must be integers >= 1; {len(bad)} are not, e.g. {bad[:3]}"
        )
    return [int(c) for c in counts]


def _check_batch_size(batch_size: float) -> float:
    if not (
        isinstance(batch_size, numbers.Real)
        and not isinstance(batch_size, bool)
        and batch_size > 0
        and math.isfinite(batch_size)
    ):
        raise ValueError(
            f"batch_size (expected units per step) must be a number > 0, got {batch_size!r}"
        )
    return float(batch_size)


def _calibration(task: tuple) -> float:
    """One calibration: ("dpsgd", target, delta, q, steps, accountant) or
    ("els", target, delta, q, k, steps). Both are cached in memory."""
    if task[0] == "dpsgd":
        return accounting.calibrate_noise(*task[1:])
    return calibrate_els_noise(*task[1:])


def _calibrate_all(tasks: list[tuple]) -> dict[tuple, float]:
    """Sigma for each distinct task (a calibration takes 0.2-3 s of single-threaded
    numpy; the planner needs about two per candidate k)."""
    return {task: _calibration(task) for task in dict.fromkeys(tasks)}


def default_bound_els(counts: Sequence[int]) -> int:
    """The ELS default k: the median number of units per user.

    counts: units per user (each >= 1). With an even number of users the median is the
    mean of the two middle values, rounded up: e.g. counts 1, 1, 10, 10 give ceil(5.5) = 6.
    """
    return math.ceil(statistics.median(_check_counts(counts)))


def default_candidates(counts: Sequence[int]) -> list[int]:
    """Candidate bounds k: 1, 2, 4, ... up to the largest count, plus the median.

    With more than MAX_POWER_CANDIDATES powers of two, every second (or third, ...) one
    is kept (a plan costs about 3 s of CPU per candidate), so a list has at most
    MAX_POWER_CANDIDATES + 1 values.
    """
    counts = _check_counts(counts)
    largest = max(counts)
    powers = [2**e for e in range(largest.bit_length())]  # 2**e <= largest
    stride = math.ceil(len(powers) / MAX_POWER_CANDIDATES)
    chosen = set(powers[::stride]) | {default_bound_els(counts)}
    return sorted(chosen)


def _check_candidates(candidates: Sequence[int] | None, counts: list[int]) -> list[int]:
    if candidates is None:
        return default_candidates(counts)
    chosen = sorted({_check_bound(k, "candidates") for k in candidates})
    if not chosen:
        raise ValueError("candidates must name at least one bound k, got none")
    return chosen


@dataclass(frozen=True)
class UlsPrediction:
    """What ULS with bound k keeps and how noisy its steps are predicted to be.

    predicted_noise: noise std over expected clipped signal, sigma / users_per_step
    (see `uls_predictions`); lower is better.
    """

    k: int
    users: int
    units_kept: int
    units_dropped: int
    mean_units_per_user: float  # m_k = mean over users of min(n_u, k)
    users_per_step: float  # q_u * users (= batch_size / m_k unless q_u is capped at 1)
    sampling_rate: float  # q_u
    noise_multiplier: float
    predicted_noise: float


def _kept(counts: list[int], k: int) -> int:
    return sum(min(n, k) for n in counts)


def uls_predictions(
    counts: Sequence[int],
    batch_size: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
    candidates: Sequence[int] | None = None,
) -> list[UlsPrediction]:
    """ULS's predicted noise for each candidate bound k at a fixed compute budget.

    counts: units per user; batch_size: expected units processed per step; steps: fixed.
    For bound k:
        m_k = (1/U) sum_u min(n_u, k)             (a user with n_u < k brings n_u units)
        q_u = min(1, batch_size / (m_k U))        (user sampling rate; U users)
        users per step = q_u U                    (= batch_size / m_k when q_u < 1)
        sigma_k = calibrate_noise(target_epsilon, delta, q_u, steps, accountant)
        predicted_noise = sigma_k / (q_u U)       (= sigma_k m_k / batch_size)
    Assumptions: every sampled user's clipped average gradient has norm C and all point
    the same way, so the expected clipped-signal sum is (users per step) C against noise
    of std sigma_k C; the units per step (compute) and the number of steps are fixed. A
    larger k keeps more data but spends each step on fewer users, so it needs less noise
    per step yet gets less signal per unit of compute (the fixed-compute trade-off that
    Charles et al. 2024 study).
    Candidates default to `default_candidates(counts)`.
    """
    counts = _check_counts(counts)
    batch_size = _check_batch_size(batch_size)
    chosen = _check_candidates(candidates, counts)
    tasks = _uls_tasks(counts, batch_size, steps, target_epsilon, delta, accountant, chosen)
    return _uls_rows(counts, chosen, tasks, _calibrate_all(list(tasks.values())))


def _uls_tasks(
    counts: list[int],
    batch_size: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
    chosen: list[int],
) -> dict[int, tuple]:
    """k -> the `calibrate_noise` task of its user sampling rate q_u (arguments checked)."""
    steps = _check_positive_steps(steps)
    target_epsilon = _check_target_epsilon(target_epsilon)
    delta = _check_delta(delta)
    accounting._check_accountant(accountant)
    return {
        k: (
            "dpsgd",
            target_epsilon,
            delta,
            min(1.0, batch_size / _kept(counts, k)),
            steps,
            accountant,
        )
        for k in chosen
    }


def _uls_rows(
    counts: list[int], chosen: list[int], tasks: dict[int, tuple], sigmas: dict[tuple, float]
) -> list[UlsPrediction]:
    users, total = len(counts), sum(counts)
    out = []
    for k in chosen:
        kept = _kept(counts, k)
        q_u = tasks[k][3]  # = min(1, batch_size / (m_k U)), m_k = kept / U
        sigma = sigmas[tasks[k]]
        out.append(
            UlsPrediction(
                k=k,
                users=users,
                units_kept=kept,
                units_dropped=total - kept,
                mean_units_per_user=kept / users,
                users_per_step=q_u * users,
                sampling_rate=q_u,
                noise_multiplier=sigma,
                predicted_noise=sigma / (q_u * users),
            )
        )
    return out


# The largest bound the k sweep measured (benchmarks/README.md): the ULS default stays
# within it.
ULS_DEFAULT_MAX = 16


def default_bound_uls(counts: Sequence[int]) -> int:
    """The ULS default k: the smallest power of two that keeps at least half of the units,
    at most ULS_DEFAULT_MAX (and at most the largest count).

    Chosen by measurement (benchmarks/k_sweep.py; the table is in benchmarks/README.md):
    on the demo task and on a heavy-tailed user distribution, at epsilon 1, 4 and 8, ULS
    with k = 1 (what the least predicted noise per step always picks) kept a third of the
    pairs or less and never gave the best held-out accuracy at epsilon 4 or 8, while the k
    keeping about half of the pairs (8 on the demo, 16 on the heavy tail) was the best or
    within noise of it. The plan's prediction is noise per step only; it does not see
    that a small k trains on little data.
    """
    counts = _check_counts(counts)
    total = sum(counts)
    k = 1
    while _kept(counts, k) < total / 2 and k < min(ULS_DEFAULT_MAX, max(counts)):
        k *= 2
    return min(k, ULS_DEFAULT_MAX, max(counts))


@dataclass(frozen=True)
class PlanRow:
    """One (algorithm, k) choice at the plan's target epsilon and compute budget.

    sampling_rate: q over units (ELS) or q_u over users (ULS).
    units_per_step: expected units processed per step (the batch size unless q is 1).
    predicted_noise: noise std over expected clipped-signal sum, both in units of C.
    is_default: the algorithm's default bound (ELS: the median; ULS: the smallest power
        of two keeping half of the units, at most 16).
    """

    algorithm: str
    k: int
    users: int
    units_kept: int
    units_dropped: int
    sampling_rate: float
    units_per_step: float
    noise_multiplier: float
    predicted_noise: float
    is_default: bool


def plan_user_level(
    counts: Sequence[int],
    batch_size: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    candidates: Sequence[int] | None = None,
) -> list[PlanRow]:
    """ELS and ULS rows for each candidate k at (target_epsilon, delta), PLD accountant.

    counts: units per user; batch_size: expected units per step; steps: fixed.
    Candidates default to `default_candidates(counts)`; the ELS default (the median) is
    always added. Every user keeps min(n_u, k) >= 1 units, so users is the same in all rows.
    - ELS row: q = min(1, batch_size / units_kept), sigma = calibrate_els_noise(target,
      delta, q, k, steps); each sampled unit's clipped gradient has norm <= C, so with all
      aligned the expected clipped-signal sum is q units_kept C and
      predicted_noise = sigma / (q units_kept) (= sigma / batch_size when q < 1).
    - ULS row: `uls_predictions` (predicted_noise = sigma_k m_k / batch_size when q_u < 1).
    The ELS noise is per unit of signal, the ULS noise per user of signal: under the same
    alignment assumption both are the std of the noise relative to the clipped update.
    About two calibrations per k: 5,000 users holding 100,000 units (Zipf), 64 units per
    step, 1,000 steps, epsilon 8 cost about 16 s of CPU (8 candidates).
    Rows: ELS by increasing k, then ULS by increasing k.
    """
    counts = _check_counts(counts)
    batch_size = _check_batch_size(batch_size)
    els_default = default_bound_els(counts)
    uls_default = default_bound_uls(counts)
    chosen = sorted(set(_check_candidates(candidates, counts)) | {els_default, uls_default})
    uls_tasks = _uls_tasks(counts, batch_size, steps, target_epsilon, delta, "pld", chosen)
    els_tasks = {}
    for k in chosen:
        q = min(1.0, batch_size / _kept(counts, k))
        # k = 1 is DP-SGD: the same task as ULS with k = 1, computed once.
        els_tasks[k] = uls_tasks[k] if k == 1 else ("els", *uls_tasks[k][1:3], q, k, steps)
    # Slowest first (DP-SGD at small sigma, then ELS by k) so that the processes finish together.
    sigmas = _calibrate_all([*uls_tasks.values(), *els_tasks.values()])
    uls = _uls_rows(counts, chosen, uls_tasks, sigmas)
    users, total = len(counts), sum(counts)
    rows = []
    for k in chosen:
        kept = _kept(counts, k)
        q = min(1.0, batch_size / kept)
        sigma = sigmas[els_tasks[k]]
        rows.append(
            PlanRow(
                algorithm="els",
                k=k,
                users=users,
                units_kept=kept,
                units_dropped=total - kept,
                sampling_rate=q,
                units_per_step=q * kept,
                noise_multiplier=sigma,
                predicted_noise=sigma / (q * kept),
                is_default=k == els_default,
            )
        )
    for p in uls:
        rows.append(
            PlanRow(
                algorithm="uls",
                k=p.k,
                users=p.users,
                units_kept=p.units_kept,
                units_dropped=p.units_dropped,
                sampling_rate=p.sampling_rate,
                units_per_step=p.sampling_rate * p.units_kept,
                noise_multiplier=p.noise_multiplier,
                predicted_noise=p.predicted_noise,
                is_default=p.k == uls_default,
            )
        )
    return rows


def format_plan(rows: Sequence[PlanRow]) -> str:
    """A fixed-width text table of `plan_user_level` rows; '*' marks each algorithm's default."""
    header = (
        "algo",
        "k",
        "users",
        "units kept",
        "dropped",
        "q",
        "units/step",
        "sigma",
        "pred. noise",
        "",
    )
    body = [
        (
            r.algorithm.upper(),
            str(r.k),
            str(r.users),
            str(r.units_kept),
            str(r.units_dropped),
            f"{r.sampling_rate:.4g}",
            f"{r.units_per_step:.4g}",
            f"{r.noise_multiplier:.4g}",
            f"{r.predicted_noise:.4g}",
            "*" if r.is_default else "",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:-1], widths[1:-1], strict=True)]
        return ("  ".join(cells) + "  " + line[-1]).rstrip()

    rule = "-" * len(render(header[:-1] + ("*",)))
    legend = "* default: ELS the median units per user, ULS the smallest power of two keeping half of them (at most 16)"
    return "\n".join([render(header), rule, *map(render, body), legend])


@dataclass
class UserBound:
    """What user-level DP's contribution bound did to the training data."""

    algorithm: str  # "els" or "uls"
    bound: int  # k
    chosen_by: str  # how k was chosen
    users: int
    units_kept: int
    units_dropped: int
    # units (examples/pairs) per user -> number of users, before the bound
    histogram: dict[int, int] = field(default_factory=dict)


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
        k = default_bound_uls(counts)
        chosen_by = "default: the smallest power of two keeping half of the pairs (at most 16)"
    kept = cap_contributions(users, k, cfg.train.seed)
    kept_items = [items[i] for i in kept]
    bound = UserBound(
        pv.user_algorithm,
        k,
        chosen_by,
        len(counts),
        len(kept),
        len(items) - len(kept),
        dict(sorted(collections.Counter(counts).items())),
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


def batch_over_share(num_units: int, rate: float, cap: int) -> float:
    """P(a Poisson sample of `num_units` units at `rate` holds more than `cap`): the share
    of steps whose sampled batch needs more than one micro-batch of `cap` units."""
    if cap >= num_units or rate <= 0:
        return 0.0
    if rate >= 1:
        return 1.0
    log_q, log_p = math.log(rate), math.log1p(-rate)
    head = sum(
        math.exp(
            math.lgamma(num_units + 1)
            - math.lgamma(k + 1)
            - math.lgamma(num_units - k + 1)
            + k * log_q
            + (num_units - k) * log_p
        )
        for k in range(cap + 1)
    )
    return max(0.0, 1.0 - head)


def micro_batch_note(num_units: int, rate: float, cap: int, name: str = "units") -> str | None:
    """A hint when `train.micro_batch_size` (`cap`) splits many Poisson batches of one-item
    units into two passes (a second pass of a few units costs about as much as the first
    on a GPU bound by kernel launches), or None when under 5% of steps are split."""
    share = batch_over_share(num_units, rate, cap)
    if share < 0.05:
        return None
    low, one_pass = cap, num_units  # the smallest cap with at most 1% of steps split
    while low + 1 < one_pass:
        mid = (low + one_pass) // 2
        low, one_pass = (
            (mid, one_pass) if batch_over_share(num_units, rate, mid) > 0.01 else (low, mid)
        )
    return (
        f"note: the sampled batch (mean {num_units * rate:.1f} {name}) is over"
        f" train.micro_batch_size {cap} in {share:.0%} of steps, each then run in more than"
        f" one pass; with privacy micro_batch_size may exceed batch_size: {one_pass} keeps"
        f" {1 - batch_over_share(num_units, rate, one_pass):.1%} of steps in one pass, if"
        " memory allows"
    )
