"""The privacy statement of a run (`privacy.json`): what was proved, for whom, end to end.

A run's own mechanism gives the *stage* epsilon. The model it ships also carries what the
earlier stages learned (the model it started from, its tokenizer), so the statement looks
at every earlier stage of the lineage (`lineage.py`) and this run's users:

- an earlier private stage with the same unit on overlapping users (by salted hash, or
  when either side names no users) is composed with this run: sequential composition of
  both stages' dp-accounting events (`ledger.composed_epsilon`), never added epsilons;
- an earlier stage on disjoint users changes nothing for this run's users: parallel
  composition, and the statement says so;
- an earlier stage without privacy (or with another unit) on overlapping users leaves
  those users with no guarantee in this model, said in plain words; the bound then holds
  only for this run's other users;
- a starting model privdpo did not train: the guarantee is relative to that model.

The statement never covers more than this: its `epsilon` is the end-to-end epsilon of
the users it names, `stage_epsilon` this run's alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from privdpo.privacy.accounting import PLD_VALUE_DISCRETIZATION, RDP_ORDERS
from privdpo.privacy.els_accounting import els_group_epsilon
from privdpo.privacy.ledger import PrivacyLedger, composed_epsilon, composition_accountant

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
class Coverage:
    """This run's place in its lineage, decided before training starts."""

    users: int | None  # this run's users (None: the data names none)
    composed: list[dict] = field(default_factory=list)  # private, same unit, overlapping
    parallel: list[dict] = field(default_factory=list)  # disjoint users
    unprotected: list[dict] = field(default_factory=list)  # overlapping, no usable guarantee
    relative_to: str | None = None  # a starting model privdpo did not train

    def problems(self) -> list[str]:
        """Why the end-to-end statement would not cover all of this run's users."""
        return [s["reason"] for s in self.unprotected]


def describe_stage(stage: dict) -> str:
    where = f" ({stage['run_dir']})" if stage.get("run_dir") else ""
    return f"the {stage['recipe']} stage{where}"


def analyze(
    ancestors: list[dict],
    ancestor_users: dict[str, dict],
    users: set[str] | None,
    salt_id: str | None,
    unit: str | None,
    start_model: dict,
) -> Coverage:
    """Sort the earlier stages by what they mean for this run's users (see the module
    doc). `ancestor_users`: stage id -> {"salt_id", "hashes"} (users.json); `users`: this
    run's salted hashes (None when the data names no users); `unit`: this run's privacy
    unit (None without privacy)."""
    coverage = Coverage(users=len(users) if users is not None else None)
    for stage in ancestors:
        theirs = ancestor_users.get(stage["id"]) if stage["users"]["known"] else None
        comparable = users is not None and theirs is not None and theirs["salt_id"] == salt_id
        overlap = len(users & set(theirs["hashes"])) if comparable else None
        entry = {
            "id": stage["id"],
            "recipe": stage["recipe"],
            "run_dir": stage.get("run_dir"),
            "private": stage["private"],
            "unit": stage.get("unit"),
            "overlapping_users": overlap,
        }
        if comparable and overlap == 0:
            coverage.parallel.append(entry)
            continue
        shared = (
            f"{overlap} of this run's users also contributed to"
            if overlap is not None
            else "this run's users cannot be told apart from those of"
        )
        if not stage["private"]:
            entry["reason"] = (
                f"{shared} {describe_stage(stage)}, which used their data without differential"
                " privacy: those users have no differential-privacy guarantee in this model"
            )
            coverage.unprotected.append(entry)
        elif unit is not None and stage.get("unit") != unit:
            entry["reason"] = (
                f"{shared} {describe_stage(stage)}, which protected each {stage.get('unit')},"
                f" not each {unit}: its guarantee does not compose into this run's, so those"
                f" users have no end-to-end {unit}-level guarantee"
            )
            coverage.unprotected.append(entry)
        else:
            entry["ledger"] = stage["ledger"]
            coverage.composed.append(entry)
    if not start_model.get("trained_by_privdpo") and start_model.get("kind") == "path":
        coverage.relative_to = start_model["path"]
    return coverage


def stage_statement(plan, ledger: PrivacyLedger, secure: bool) -> dict:
    """This run's own mechanism: unit, epsilon, delta, algorithm, accountant, parameters."""
    eps = ledger.epsilon()
    p = plan
    algorithm = USER_ALGORITHMS[p.users.algorithm] if p.users else ALGORITHM
    settings = (
        {"value_discretization_interval": PLD_VALUE_DISCRETIZATION, "pessimistic_estimate": True}
        if p.accountant == "pld"
        else {"orders": list(RDP_ORDERS)}
    )
    out = {
        "unit": p.unit,
        "level": f"{p.unit}-level",
        "private": math.isfinite(eps),
        "stage_epsilon": eps if math.isfinite(eps) else None,
        "delta": p.delta,
        "algorithm": algorithm,
        "accountant": f"dp-accounting {p.accountant.upper()}",
        "accountant_settings": settings,
        "neighbouring": f"add or remove one {p.unit}"
        + (" (with all of their data)" if p.users else ""),
        "sampling": f"Poisson, rate q = {p.sampling_rate:.6g}",
        "sampling_rate": p.sampling_rate,
        "clipping_norm": p.max_grad_norm,
        "noise_multiplier": p.noise_multiplier,
        "steps": ledger.steps,
        "dataset_size": p.num_units,
        "secure_noise": secure,
        "ledger": ledger.to_dict(),
    }
    if p.users is not None:
        u = p.users
        out |= {
            "user_algorithm": u.algorithm.upper(),
            "contribution_bound": u.bound,
            "contribution_bound_chosen_by": u.chosen_by,
            "users": u.users,
            "units_kept": u.units_kept,
            "units_dropped": u.units_dropped,
            "units_per_user_histogram": u.histogram,
            "sampling": (
                f"Poisson over {'users' if u.algorithm == 'uls' else 'examples/pairs'},"
                f" rate q = {p.sampling_rate:.6g}"
            ),
            "dataset_size": u.users,
        }
        if u.algorithm == "els" and math.isfinite(eps):
            steps = ledger.steps  # the loose bound, for comparison only
            group = (
                els_group_epsilon(p.sampling_rate, p.noise_multiplier, u.bound, steps, p.delta)
                if steps
                else 0.0
            )
            # None: no finite bound (privacy.json is strict JSON, without Infinity).
            out["group_privacy_epsilon"] = group if math.isfinite(group) else None
    return out


def statement(plan, ledger: PrivacyLedger, secure: bool, coverage: Coverage | None) -> dict:
    """The whole statement: the stage, the end-to-end bound over the lineage, and a summary
    in plain words that claims no more than both."""
    out = stage_statement(plan, ledger, secure)
    p = plan
    coverage = coverage or Coverage(users=None)
    under = f", under {p.users.algorithm.upper()} with k = {p.users.bound}" if p.users else ""
    if not out["private"]:
        out["epsilon"] = None
        out["end_to_end"] = None
        out["summary"] = (
            f"Not differentially private: this run added no noise (noise multiplier"
            f" {p.noise_multiplier}), so no {p.unit} has any guarantee."
        )
        return out
    stage_eps = out["stage_epsilon"]
    ledgers = [PrivacyLedger.from_dict(s["ledger"]) for s in coverage.composed] + [ledger]
    end_eps = composed_epsilon(ledgers, p.delta) if coverage.composed else stage_eps
    if coverage.composed:
        relation = "sequential"
    elif coverage.parallel:
        relation = "parallel"
    else:
        relation = "single stage"
    out["epsilon"] = end_eps
    out["end_to_end"] = {
        "epsilon": end_eps,
        "delta": p.delta,
        "composition": relation,
        "composed_stages": [_public(s) | {"ledger": s["ledger"]} for s in coverage.composed],
        "parallel_stages": [_public(s) for s in coverage.parallel],
        "no_guarantee": [_public(s) | {"reason": s["reason"]} for s in coverage.unprotected],
        "relative_to_starting_model": coverage.relative_to,
        "accountant": f"dp-accounting {composition_accountant(ledgers).upper()}",
    }
    parts = [
        f"This run: each {p.unit}'s influence is bounded by (epsilon = {stage_eps:.4g}, delta ="
        f" {p.delta:.3g})-differential privacy{under}: {out['algorithm']}, accounted with"
        f" dp-accounting's {p.accountant.upper()} accountant."
    ]
    whom = f"each {p.unit} of this run"
    if coverage.unprotected:
        whom += " other than those named below"
    if relation == "sequential":
        names = ", ".join(describe_stage(s) for s in coverage.composed)
        parts.append(
            f"End to end, with {names} on the same {p.unit}s (the dp-accounting composition of"
            f" every stage's steps): (epsilon = {end_eps:.4g}, delta = {p.delta:.3g}) for {whom}."
        )
    elif relation == "parallel":
        names = ", ".join(describe_stage(s) for s in coverage.parallel)
        parts.append(
            f"End to end: the same bound for {whom}; {names} used other users (no overlap by"
            " hashed user id), so by parallel composition it adds nothing for them."
        )
    else:
        parts.append(f"End to end: the same bound for {whom}; no earlier stage used private data.")
    for s in coverage.unprotected:
        parts.append(s["reason"][0].upper() + s["reason"][1:] + ".")
    if coverage.relative_to:
        parts.append(
            f"The guarantee is relative to the starting model {coverage.relative_to}, which"
            " privdpo did not train: what it learned before is not covered."
        )
    out["summary"] = " ".join(parts)
    return out


def _public(stage: dict) -> dict:
    return {
        k: stage[k] for k in ("id", "recipe", "run_dir", "private", "unit", "overlapping_users")
    }


def write_statement(statement: dict, *directories: Path) -> None:
    """privacy.json into each directory (strict JSON: no NaN or Infinity)."""
    text = json.dumps(statement, indent=2, allow_nan=False) + "\n"
    for d in directories:
        (d / "privacy.json").write_text(text, encoding="utf-8")
