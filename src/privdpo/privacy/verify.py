"""`privdpo privacy verify RUN_DIR`: every epsilon of a run, recomputed from its ledger.

The run's `privacy.json` holds its ledger (the steps it took: sampling rate, noise
multiplier, count; the ELS bound) and, for an end-to-end bound, the ledgers of the
earlier stages it composed. Here each is turned back into dp-accounting events and
measured with plain dp-accounting calls, with the accountant and settings the statement
names (PLD at its stated value discretization; RDP at its orders), and also with
dp-accounting's default PLD discretization: a reported epsilon must match the first and
never be below the second. An ELS statement's `group_privacy_epsilon` (the loose
group-privacy bound it gives for comparison) is recomputed too: the unit-level PLD from
dp-accounting, then the group-privacy grid search written out here. Nothing of privdpo's
own accounting code is used, apart from building the events from the ledger's numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np

from privdpo.errors import UserError
from privdpo.privacy.ledger import PrivacyLedger

MATCH = 1e-9  # relative
_NEIGHBOURS = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def plain_epsilon(events: list, delta: float, accountant: str, settings: dict | None) -> float:
    """dp-accounting's epsilon of `events` composed, with the stated accountant settings
    (None: dp-accounting's defaults)."""
    if not events:
        return 0.0
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    if accountant == "pld":
        kwargs = {}
        if settings:
            kwargs["value_discretization_interval"] = settings["value_discretization_interval"]
        acc = dp_accounting.pld.PLDAccountant(neighboring_relation=_NEIGHBOURS, **kwargs)
    else:
        orders = settings["orders"] if settings else None
        acc = dp_accounting.rdp.RdpAccountant(
            **({"orders": orders} if orders else {}), neighboring_relation=_NEIGHBOURS
        )
    return float(acc.compose(event).get_epsilon(delta))


def _compare(stated: float | None, recomputed: float) -> tuple[bool, float]:
    """(matches, relative difference); a stated None stands for an infinite epsilon."""
    if stated is None or not math.isfinite(recomputed):
        match = stated is None and not math.isfinite(recomputed)
        return match, 0.0 if match else math.inf
    rel = abs(recomputed - stated) / max(abs(recomputed), 1e-300)
    return rel <= MATCH, rel


def _check(name: str, stated, events, delta, accountant, settings) -> dict:
    recomputed = plain_epsilon(events, delta, accountant, settings)
    default = plain_epsilon(events, delta, "pld", None) if accountant == "pld" else None
    match, rel = _compare(stated, recomputed)
    below = default is not None and stated is not None and stated < default * (1 - MATCH)
    return {
        "name": name,
        "stated": stated,
        "recomputed": recomputed,
        "relative_difference": rel,
        "matches": match,
        "dp_accounting_default_pld": default,
        "below_default": below,
    }


def plain_group_epsilon(events: list, k: int, delta: float, settings: dict) -> float:
    """The group-privacy epsilon of ELS's statement (`group_privacy_epsilon`, a loose bound
    given for comparison), recomputed: the unit-level PLD of `events` from dp-accounting's
    PLD accountant; then the smallest eps1 on a grid of step 1e-4 with
    delta1(eps1) * sum_{i<k} e^{i eps1} <= delta (group privacy for k units), times k."""
    if not events:
        return 0.0
    acc = dp_accounting.pld.PLDAccountant(
        neighboring_relation=_NEIGHBOURS,
        value_discretization_interval=settings["value_discretization_interval"],
    )
    acc.compose(dp_accounting.ComposedDpEvent(events))

    def feasible(eps1: np.ndarray) -> np.ndarray:
        i = np.arange(k)[:, None]
        with np.errstate(divide="ignore"):
            log_sum = np.logaddexp.reduce(i * eps1[None, :], axis=0)
            log_delta1 = np.log(np.asarray(acc.get_delta(eps1), dtype=float))
        return log_delta1 + log_sum <= math.log(delta)

    top = 16.0  # a coarse scan at step 0.01 for the first feasible eps1, then 1e-4 below it
    while not (ok := np.flatnonzero(feasible(np.arange(round(top * 100) + 1) / 100))).size:
        if top >= 1000:
            return math.inf
        top *= 2
    first = int(ok[0])
    if first == 0:
        return 0.0
    fine = (first - 1) / 100 + np.arange(1, 101) / 1e4
    fine[-1] = first / 100
    return float(k * fine[np.flatnonzero(feasible(fine))[0]])


def verify(run_dir: str | Path) -> list[dict]:
    """One check per epsilon of the run's privacy.json (its stage, its end to end, and an
    ELS run's group-privacy comparison bound)."""
    path = Path(run_dir) / "privacy.json"
    if not path.is_file():
        raise UserError(
            f"privacy verify: {path} does not exist; point at the directory of a private run"
            " (or its exported model/ or adapter/)"
        )
    try:
        statement = json.loads(path.read_text(encoding="utf-8"))
        ledger = PrivacyLedger.from_dict(statement["ledger"])
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"privacy verify: {path} holds no privacy ledger privdpo can read ({e}); it was"
            " written by an older privdpo or edited"
        ) from None
    delta = statement["delta"]
    accountant = ledger.accountant
    settings = statement.get("accountant_settings")
    checks = [
        _check(
            "this run", statement.get("stage_epsilon"), ledger.events(), delta, accountant, settings
        )
    ]
    if "group_privacy_epsilon" in statement and ledger.els_bound is not None:
        # The bound given for comparison: the same steps as unit-level DP-SGD, k units a user.
        units = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
            for q, sigma, steps in ledger.segments
            if steps
        ]
        stated = statement["group_privacy_epsilon"]  # None: no finite bound
        recomputed = plain_group_epsilon(units, ledger.els_bound, delta, settings)
        match, rel = _compare(stated, recomputed)
        checks.append(
            {
                "name": "group bound",
                "stated": stated,
                "recomputed": recomputed,
                "relative_difference": rel,
                "matches": match,
                "dp_accounting_default_pld": None,
                "below_default": False,
            }
        )
    end = statement.get("end_to_end")
    if end and end.get("composed_stages"):
        ledgers = [PrivacyLedger.from_dict(s["ledger"]) for s in end["composed_stages"]] + [ledger]
        events = [e for led in ledgers for e in led.events()]
        name = end["accountant"].removeprefix("dp-accounting ").lower()
        stage_settings = settings if name == accountant else None
        if name == "pld" and stage_settings is None:
            from privdpo.privacy.accounting import PLD_VALUE_DISCRETIZATION

            stage_settings = {"value_discretization_interval": PLD_VALUE_DISCRETIZATION}
        checks.append(
            _check("end to end", end["epsilon"], events, end["delta"], name, stage_settings)
        )
    return checks


def report(checks: list[dict]) -> str:
    lines = [
        f"{'epsilon':<12} {'stated':>14} {'dp-accounting':>14} {'rel. diff':>10} {'default PLD':>14}  verdict"
    ]
    for c in checks:
        problems = [] if c["matches"] else ["MISMATCH"]
        if c["below_default"]:
            problems.append("BELOW dp-accounting's default")
        verdict = "; ".join(problems) or "ok"

        def num(x):
            return f"{x:.10g}" if isinstance(x, float) else str(x)

        lines.append(
            f"{c['name']:<12} {num(c['stated']):>14} {num(c['recomputed']):>14}"
            f" {c['relative_difference']:>10.2g} {num(c['dp_accounting_default_pld']):>14}  {verdict}"
        )
    return "\n".join(lines)
