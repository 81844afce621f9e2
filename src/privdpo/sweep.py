"""`privdpo sweep`: one run per point of a grid of config values, compared in sweep.html.

The grid is the cartesian product of `--grid KEY=V1,V2,...` axes over one sft or dpo
config. Each point is an ordinary run directory `<output.dir>/<point name>`, trained by
the ordinary recipe, one after another. Running the same command again continues the
sweep: a finished point (its exported model and `sweep_point.json`) is reused untouched,
an interrupted one resumes from its newest checkpoint, one that never checkpointed starts
over. Every point's config is checked before anything runs.

`privacy.target_epsilon=inf` is the non-private point (privacy.enabled=false); any other
epsilon turns privacy on. The results are `sweep.json` (every point: its values, the last
value of every metric, epsilon) and `sweep.html`: the table of points, the privacy-utility
curve (metric vs epsilon), the beta curve (metric vs dpo.beta), and the best point by one
named metric, marked.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from privdpo.checkpoint import list_checkpoints
from privdpo.config import DPORunConfig, SFTRunConfig, load_config, to_dict
from privdpo.errors import ConfigError, UserError
from privdpo.metrics import read_metrics
from privdpo.privacy.ledger import PrivacyLedger, composed_epsilon, composition_accountant
from privdpo.report import (
    CSS,
    REPORT_FILE,
    figure_img,
    fmt_number,
    html_table,
    last_value,
)

SWEEP_JSON = "sweep.json"
SWEEP_HTML = "sweep.html"
POINT_FILE = "sweep_point.json"  # written into a point's run directory once it finished
EPSILON_KEY = "privacy.target_epsilon"
BETA_KEY = "dpo.beta"
NO_DP = {"inf", ".inf", "+inf", "infinity"}  # epsilon values that mean "not private"
DEFAULT_METRIC = {"dpo": "eval/rewards/accuracies", "sft": "eval/loss"}
GRID_FIX = "write each axis as KEY=V1,V2,... (e.g. --grid dpo.beta=0.05,0.1,0.5)"
# What happens to a point, and the status it then has in sweep.json and sweep.html.
STATUS = {"reuse": "reused", "resume": "resumed", "run": "ran", "restart": "restarted"}


@dataclass
class Axis:
    key: str  # dotted config key
    texts: list[str]  # the values as typed: they name the point directories
    label: str = ""  # short name in point names and figures (the key's last part)


@dataclass
class Point:
    name: str
    texts: dict[str, str]  # axis key -> value as typed
    overrides: list[str]
    cfg: Any = None
    values: dict[str, Any] = field(default_factory=dict)  # axis key -> value in the config
    action: str = "run"  # a key of STATUS
    status: str = "pending"
    record: dict | None = None
    # (salt id, salted hashes of the point's users) from its users.json; None when the data
    # names no users. Compared across points, never written to sweep.json.
    users: tuple[str, frozenset[str]] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.dir)


# ---- the grid ----------------------------------------------------------------------------
def parse_grid(items: list[str]) -> tuple[list[Axis], list[str]]:
    """Axes from `KEY=V1,V2,...` items (a comma inside [...], {...} or quotes stays in its
    value), and the overrides among them: a `KEY=VALUE` of one value is the same for every
    point, as if given before --grid. Raises UserError naming the item and the fix."""
    axes: list[Axis] = []
    fixed: list[str] = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+", key):
            raise UserError(f"--grid {item!r}: not an axis; {GRID_FIX}")
        texts = split_values(text, item)
        if len(texts) == 1:  # privacy.target_epsilon=8 turns privacy on here too
            fixed.extend(axis_overrides(key, texts[0]))
            continue
        if len(set(texts)) < len(texts):
            raise UserError(f"--grid {item!r}: a value is repeated; list each value once")
        if key.startswith("output."):
            raise UserError(
                f"--grid {item!r}: output.* cannot vary: output.dir is the sweep directory and"
                " the sweep manages its points' runs; set output keys in the config"
            )
        if any(a.key == key for a in axes):
            raise UserError(f"--grid: {key} is given twice; list all its values in one axis")
        axes.append(Axis(key, texts))
    if not axes:
        raise UserError(
            f"--grid {' '.join(items)}: no axis (a key with two or more comma-separated"
            f" values); {GRID_FIX}"
        )
    keys = {a.key for a in axes}
    if EPSILON_KEY in keys and "privacy.enabled" in keys:
        raise UserError(
            "--grid: privacy.enabled follows privacy.target_epsilon (inf: false, any other"
            " value: true); drop the privacy.enabled axis"
        )
    for a in axes:
        last = a.key.rsplit(".", 1)[1]
        shared = sum(b.key.rsplit(".", 1)[1] == last for b in axes) > 1
        a.label = a.key.replace(".", "-") if shared else last
    return axes, fixed


def split_values(text: str, item: str) -> list[str]:
    """`0.1,[1,2],'a,b'` -> ['0.1', '[1,2]', "'a,b'"]: split at top-level commas."""
    values, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth < 0:
                break
        elif c == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    if quote or depth:
        raise UserError(f"--grid {item!r}: unbalanced brackets or quotes; {GRID_FIX}")
    values.append(text[start:].strip())
    if any(v == "" for v in values):
        raise UserError(f"--grid {item!r}: an empty value; {GRID_FIX}")
    return values


def is_no_dp(text: str) -> bool:
    return text.strip().lower() in NO_DP


def axis_overrides(key: str, text: str) -> list[str]:
    """The overrides that put one axis value into a point's config."""
    if key != EPSILON_KEY:
        return [f"{key}={text}"]
    if is_no_dp(text):
        return ["privacy.enabled=false", f"{EPSILON_KEY}=null"]
    return ["privacy.enabled=true", f"{key}={text}"]


def point_name(axes: list[Axis], texts: dict[str, str]) -> str:
    """`beta-0.05_target_epsilon-1`: readable and safe as a directory name."""
    parts = []
    for axis in axes:
        value = re.sub(r"[^A-Za-z0-9.+-]+", "_", texts[axis.key]).strip("_") or "empty"
        parts.append(f"{axis.label}-{value}")
    return "_".join(parts)


def config_kind(path: str, overrides: list[str], axes: list[Axis]) -> str:
    """dpo when the config file, an override or an axis has a `dpo` section; else sft."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {file} not found; pass the path of a YAML config")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {file} is not valid YAML: {e}") from None
    keys = [o.partition("=")[0] for o in overrides] + [a.key for a in axes]
    in_file = isinstance(raw, dict) and "dpo" in raw
    return "dpo" if in_file or any(k.startswith("dpo.") for k in keys) else "sft"


def dotted(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ---- planning: every point checked before anything runs ----------------------------------
def plan_sweep(config: str, axes: list[Axis], overrides: list[str]) -> tuple[Path, list[Point]]:
    """The sweep directory and its points, each with its checked config and what the sweep
    will do with it; raise UserError listing every problem of every point."""
    cls = DPORunConfig if config_kind(config, overrides, axes) == "dpo" else SFTRunConfig
    points: list[Point] = []
    problems: dict[str, list[str]] = {}
    for combo in itertools.product(*(a.texts for a in axes)):
        texts = dict(zip((a.key for a in axes), combo, strict=True))
        name = point_name(axes, texts)
        extra = [o for key, text in texts.items() for o in axis_overrides(key, text)]
        point = Point(name, texts, [*overrides, *extra])
        if any(p.name == name for p in points):
            raise UserError(
                f"--grid: two points get the directory name {name}; make their values differ"
                " in letters or digits"
            )
        try:
            point.cfg = load_config(cls, config, point.overrides)
        except ConfigError as e:
            problems[name] = e.problems
        points.append(point)
    if problems:
        raise UserError(_problem_text(problems, len(points), "config problems"))

    sweep_dir = Path(points[0].cfg.output.dir)
    if points[0].cfg.output.overwrite:
        raise UserError(
            "output.overwrite: a sweep never replaces itself: running it again reuses finished"
            " points and resumes interrupted ones. To start over, delete"
            f" {sweep_dir} or choose another output.dir; set output.overwrite=false"
        )
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"output.dir: {sweep_dir} is a file; the sweep needs a directory")
    for point in points:
        for a in axes:
            value = dotted(point.cfg, a.key)
            no_dp = a.key == EPSILON_KEY and is_no_dp(point.texts[a.key])
            point.values[a.key] = math.inf if no_dp else value
        # The sweep owns its points' directories: one with no checkpoint is started over.
        point.cfg.output.dir = str(sweep_dir / point.name)
        point.cfg.output.overwrite = True
        point.action, problem = _action(point)
        if problem:
            problems[point.name] = [problem]
    if problems:
        raise UserError(_problem_text(problems, len(points), "problems with earlier runs"))
    return sweep_dir, points


def _action(point: Point) -> tuple[str, str | None]:
    """reuse, resume, restart or run; and a problem when an earlier run of the point does
    not fit its config."""
    run_dir = point.run_dir
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "run", None
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "run", (
            f"{run_dir} holds files but no privdpo run (no config.yaml); move it away or delete it"
        )
    finished = (run_dir / POINT_FILE).is_file() and (
        (run_dir / "model").is_dir() or (run_dir / "adapter").is_dir()
    )
    if finished:
        action = "reuse"
    elif list_checkpoints(run_dir):
        action = "resume"
    else:
        return "restart", None
    before = _flatten(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    now = _flatten(to_dict(point.cfg))
    ignored = {"output.progress_bar", "output.dir"}  # they do not change the result
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    changed = [k for k in changed if k not in ignored]
    if not changed:
        return action, None
    diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
    return action, (
        f"the run in {run_dir} was made with other settings ({diffs}); restore them to"
        f" {'reuse' if action == 'reuse' else 'resume'} it, or delete {run_dir} to run the"
        " point again"
    )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _problem_text(problems: dict[str, list[str]], total: int, what: str) -> str:
    """Every problem once: those every point shares first, then each point's own."""
    shared = []
    if len(problems) == total:
        shared = [
            p for p in next(iter(problems.values())) if all(p in v for v in problems.values())
        ]
    lines = [f"sweep: {len(problems)} of {total} points have {what}; nothing was run:"]
    lines += [f"  - every point: {p}" for p in shared]
    for name, items in problems.items():
        lines += [f"  - point {name}: {p}" for p in items if p not in shared]
    return "\n".join(lines)


# ---- running -----------------------------------------------------------------------------
def run_sweep(
    config: str, grid: list[str], overrides: list[str], metric: str | None = None
) -> dict:
    """`privdpo sweep`: plan and check every point, run (or reuse, or resume) each in
    turn, write sweep.json and sweep.html after each; return what sweep.json holds."""
    axes, fixed = parse_grid(grid)
    sweep_dir, points = plan_sweep(config, axes, [*overrides, *fixed])
    kind = "dpo" if isinstance(points[0].cfg, DPORunConfig) else "sft"
    metric = metric or DEFAULT_METRIC[kind]
    shape = " x ".join(f"{len(a.texts)} {a.key}" for a in axes)
    print(f"sweep: {len(points)} {kind} points ({shape}) in {sweep_dir}; metric {metric}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(kind)
    for i, point in enumerate(points, 1):
        print(f"sweep point {i}/{len(points)} {point.name}: {_saying(point)}", flush=True)
        if point.action != "reuse":
            (point.run_dir / POINT_FILE).unlink(missing_ok=True)
            try:
                recipe(point.cfg, resume=point.action == "resume")
            except UserError as e:
                raise UserError(f"sweep point {point.name} ({point.run_dir}): {e}") from None
        point.record = point_record(point, metric)
        point.users = point_users(point.run_dir, point.record.get("stage_id"))
        point.status = STATUS[point.action]
        if point.action != "reuse":
            marker = {"point": point.name, "values": point.values, **point.record}
            (point.run_dir / POINT_FILE).write_text(
                json.dumps(marker, indent=2) + "\n", encoding="utf-8"
            )
        result = write_results(sweep_dir, config, kind, axes, points, metric)
    _print_summary(result, sweep_dir)
    if result["best"] is None:
        available = sorted({k for p in points for k in _metric_names(p.record)})
        raise UserError(
            f"--metric {metric}: no point has it, so no best point is marked (the runs"
            f" finished; sweep.html has the table). Available: {', '.join(available)}."
            " Run again with --metric NAME: finished points are reused"
        )
    return result


def _recipe(kind: str):
    if kind == "dpo":
        from privdpo.recipes.dpo import run_dpo

        return run_dpo
    from privdpo.recipes.sft import run_sft

    return run_sft


def _saying(point: Point) -> str:
    if point.action == "reuse":
        return f"reused (finished earlier in {point.run_dir})"
    if point.action == "resume":
        last = list_checkpoints(point.run_dir)[-1]
        return f"resuming the interrupted run from {last}"
    if point.action == "restart":
        return f"starting over ({point.run_dir} has no checkpoint from an earlier attempt)"
    return f"running in {point.run_dir}"


# ---- results -----------------------------------------------------------------------------
def lower_is_better(metric: str) -> bool:
    """As for early stopping: lower is better when the name says loss or perplexity."""
    return "loss" in metric or "perplexity" in metric


def point_record(point: Point, metric: str) -> dict:
    """What a finished point's directory says: last metrics, eval.json, privacy."""
    run_dir = point.run_dir
    records = read_metrics(run_dir)
    keys = sorted({k for r in records for k in r} - {"step"})
    final = {k: last[1] for k in keys if (last := last_value(records, k)) is not None}
    evaluation = _read_json(run_dir / "eval.json") or {}
    eval_metrics = {}
    for name, m in (evaluation.get("metrics") or {}).items():
        value = m.get("value") if isinstance(m, dict) else m
        if isinstance(value, int | float) and not isinstance(value, bool):
            eval_metrics[name] = value
    epsilon, delta, unit, ledger, stage_epsilon = math.inf, None, None, None, None
    end: dict = {}
    if point.cfg.privacy.enabled:
        statement = _read_json(run_dir / "privacy.json") or {}
        epsilon = statement.get("epsilon")  # end to end
        stage_epsilon = statement.get("stage_epsilon")
        delta, unit = statement.get("delta"), statement.get("unit")
        ledger = statement.get("ledger")
        end = statement.get("end_to_end") or {}
    lineage = _read_json(run_dir / "lineage.json") or {}
    stages = lineage.get("stages") or []
    # metrics.jsonl first; eval.json's names (win_rate, kl_to_reference, ...) differ.
    source = "metrics.jsonl" if metric in final else "eval.json" if metric in eval_metrics else None
    steps = [r["step"] for r in records if "loss" in r]
    return {
        "metric": final.get(metric, eval_metrics.get(metric)),
        "metric_from": source,
        "private": point.cfg.privacy.enabled,
        "epsilon": epsilon,
        "stage_epsilon": stage_epsilon,
        "delta": delta,
        "unit": unit,
        "ledger": ledger,
        # This run's stage in its lineage, and what its end-to-end epsilon covers: the
        # earlier private stages composed with it (with their ledgers), the earlier stages
        # that leave some of its users without a guarantee, the model it is relative to.
        "stage_id": stages[-1]["id"] if stages else None,
        "earlier_stages": [
            {k: s[k] for k in ("id", "recipe", "run_dir", "ledger")}
            for s in end.get("composed_stages", [])
        ],
        "no_guarantee": [
            {k: s[k] for k in ("id", "recipe", "run_dir", "reason")}
            for s in end.get("no_guarantee", [])
        ],
        "relative_to": end.get("relative_to_starting_model"),
        "steps": max(steps, default=0),
        "final_metrics": final,
        "eval_metrics": eval_metrics,
    }


def point_users(run_dir: Path, stage_id: str | None) -> tuple[str, frozenset[str]] | None:
    """The salted hashes of a point's users (users.json), to compare with other points'."""
    users = (_read_json(run_dir / "users.json") or {}).get("stages", {}).get(stage_id)
    return (users["salt_id"], frozenset(users["hashes"])) if users else None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sweep: {path} is not valid JSON ({e}); fix or remove it") from None


def _metric_names(record: dict | None) -> list[str]:
    if not record:
        return []
    return [*record["final_metrics"], *record["eval_metrics"]]


def best_point(points: list[Point], metric: str) -> Point | None:
    """The finished point with the best finite value of `metric`; the first on a tie."""
    scored = [p for p in points if p.record and _finite(p.record["metric"])]
    if not scored:
        return None
    sign = 1 if lower_is_better(metric) else -1
    return min(scored, key=lambda p: sign * p.record["metric"])


def sweep_privacy(points: list[Point]) -> dict | None:
    """The privacy cost of the sweep as a release: choosing one model by the points'
    results releases something about all of them.

    Private points with the same unit whose users may overlap are *the same users*: by
    salted hash of the user ids where both points have them (same salt), else assumed
    (data without user ids, or hashes under another salt). Such points are grouped
    (transitively), and each group's mechanisms compose sequentially in dp-accounting:
    every point's own steps and the earlier private stages each point's end-to-end epsilon
    already composes (a DP-SFT parent, ...), each stage once by its id however many points
    start from it. Groups on disjoint users compose in parallel: the sweep's epsilon for a
    unit is the largest of its groups'. Earlier stages that left some users without a
    guarantee, and starting models a guarantee is relative to, carry over as they are; a
    choice that also looks at non-private points has no guarantee. Tuning bounds such as
    Papernot and Steinke 2022 need a random number of runs; a fixed grid gets composition."""
    done = [p for p in points if p.record]
    private = [p for p in done if p.record["private"] and p.record.get("ledger")]
    if not private:
        return None
    out = {"private_points": len(private), "non_private_points": len(done) - len(private)}
    by_unit: dict[str, list[Point]] = {}
    for p in private:
        by_unit.setdefault(p.record["unit"], []).append(p)
    groups = []
    for unit, members in by_unit.items():
        for group in _same_users(members):
            stages: dict[str, dict] = {}  # stage id -> ledger, each stage once
            earlier: dict[str, dict] = {}
            for p in group:
                for st in p.record.get("earlier_stages") or []:
                    stages.setdefault(st["id"], st["ledger"])
                    earlier.setdefault(st["id"], {k: st[k] for k in ("id", "recipe", "run_dir")})
                stages.setdefault(p.record.get("stage_id") or p.name, p.record["ledger"])
            ledgers = [PrivacyLedger.from_dict(led) for led in stages.values()]
            delta = min(p.record["delta"] for p in group)
            hashed = [p.users for p in group if p.users is not None]
            groups.append(
                {
                    "unit": unit,
                    "points": [p.name for p in group],
                    "earlier_stages": list(earlier.values()),
                    "stages_composed": len(stages),
                    "same_users": _same_users_text(group, hashed),
                    "delta": delta,
                    "epsilon": composed_epsilon(ledgers, delta),
                    "accountant": f"dp-accounting {composition_accountant(ledgers).upper()}",
                }
            )
    out["composed"] = groups
    out["epsilon"] = {
        unit: max(g["epsilon"] for g in groups if g["unit"] == unit) for unit in by_unit
    }
    unprotected: dict[str, dict] = {}
    for p in private:
        for st in p.record.get("no_guarantee") or []:
            unprotected.setdefault(st["id"], st)
    out["no_guarantee"] = list(unprotected.values())
    out["relative_to"] = sorted(
        {p.record["relative_to"] for p in private if p.record.get("relative_to")}
    )
    out["statement"] = _sweep_statement(out)
    return out


def _same_users(points: list[Point]) -> list[list[Point]]:
    """Points grouped by possibly shared users: two points are linked unless both have
    salted user hashes under one salt and those are disjoint; the groups are the connected
    parts, each in the points' order."""
    group_of = list(range(len(points)))  # union-find over point indices

    def root(i: int) -> int:
        while group_of[i] != i:
            i = group_of[i]
        return i

    for i, j in itertools.combinations(range(len(points)), 2):
        if not _disjoint(points[i], points[j]):
            group_of[root(j)] = root(i)
    groups: dict[int, list[Point]] = {}
    for i, p in enumerate(points):
        groups.setdefault(root(i), []).append(p)
    return list(groups.values())


def _disjoint(a: Point, b: Point) -> bool:
    if a.users is None or b.users is None or a.users[0] != b.users[0]:
        return False  # cannot be told apart: the same users
    return not a.users[1] & b.users[1]


def _same_users_text(group: list[Point], hashed: list) -> str:
    if len(hashed) < len(group):
        return (
            "assumed the same: some points' data name no users, or were hashed under another salt"
        )
    union = frozenset().union(*(h[1] for h in hashed))
    users = f"{len(union)} user{'s' if len(union) != 1 else ''}"
    if len(group) == 1:
        return f"{users}, by salted hash of the user ids"
    if all(h[1] == hashed[0][1] for h in hashed):
        return f"the same {users} in every point, by salted hash of the user ids"
    return f"{users}, overlapping between the points, by salted hash of the user ids"


def _sweep_statement(out: dict) -> str:
    parts = []
    for g in out["composed"]:
        earlier = ", ".join(
            f"the {s['recipe']} stage ({s['run_dir']})" if s.get("run_dir") else s["recipe"]
            for s in g["earlier_stages"]
        )
        with_earlier = (
            f", with those of the earlier private stages they start from counted once each"
            f" ({earlier}),"
            if earlier
            else ""
        )
        names = ", ".join(g["points"])
        if len(g["points"]) == 1:
            head = f"Point {names} ({g['unit']} level; users: {g['same_users']}):"
        else:
            head = (
                f"Points {names} ({g['unit']} level; users: {g['same_users']}): choosing"
                " among them releases all of them, so"
            )
        parts.append(
            f"{head} {'its' if len(g['points']) == 1 else 'their'} steps{with_earlier} compose sequentially in {g['accountant']} to"
            f" epsilon = {fmt_number(g['epsilon'])} at delta = {fmt_number(g['delta'])}"
            " (each point's own end-to-end epsilon is in the table of points)."
        )
    for unit, eps in out["epsilon"].items():
        several = sum(g["unit"] == unit for g in out["composed"]) > 1
        if several:
            parts.append(
                f"The {unit}-level groups above have disjoint users (by salted hash), so they"
                f" compose in parallel: the sweep's {unit}-level epsilon is {fmt_number(eps)}."
            )
    for st in out["no_guarantee"]:
        parts.append(f"Carried over from a point's own statement: {st['reason']}.")
    for path in out["relative_to"]:
        parts.append(
            f"Relative to the starting model {path}, which privdpo did not train: what it"
            " learned before is not covered."
        )
    if out["non_private_points"]:
        parts.append(
            f"{out['non_private_points']} point(s) trained on the same data without privacy: a"
            " model chosen by comparing with them has no guarantee from the sweep."
        )
    parts.append(
        "This is a fixed grid, so no private-tuning bound (e.g. Papernot and Steinke 2022, which"
        " needs a random number of runs) applies."
    )
    return " ".join(parts)


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def write_results(
    sweep_dir: Path, config: str, kind: str, axes: list[Axis], points: list[Point], metric: str
) -> dict:
    """Write sweep.json and sweep.html (finished points so far, the rest pending)."""
    best = best_point(points, metric)
    result = {
        "config": str(config),
        "kind": kind,
        "grid": {a.key: a.texts for a in axes},
        "metric": metric,
        "lower_is_better": lower_is_better(metric),
        "best": best.name if best else None,
        "privacy": sweep_privacy(points),
        "points": [
            {
                "name": p.name,
                "dir": str(p.run_dir),
                "values": p.values,
                "status": p.status,
                "best": p is best,
                **(p.record or {}),
            }
            for p in points
        ],
    }
    _write_atomic(sweep_dir / SWEEP_JSON, json.dumps(result, indent=2) + "\n")
    html = render_sweep(sweep_dir, axes, points, metric, best, config)
    _write_atomic(sweep_dir / SWEEP_HTML, html)
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _print_summary(result: dict, sweep_dir: Path) -> None:
    metric = result["metric"]
    better = "lower" if result["lower_is_better"] else "higher"
    width, m = max(len(p["name"]) for p in result["points"]), max(12, len(metric))
    print(f"\nsweep results ({metric}, {better} is better):")
    print(f"  {'point':<{width}}  {metric:>{m}}  {'epsilon':>12}  status")
    for p in result["points"]:
        mark = "  <- best" if p["best"] else ""
        print(
            f"  {p['name']:<{width}}  {fmt_number(p.get('metric')):>{m}}"
            f"  {_epsilon_text(p):>12}  {p['status']}{mark}"
        )
    missing = [p["name"] for p in result["points"] if p.get("metric") is None]
    if missing and len(missing) < len(result["points"]):
        print(f"{metric} is missing from {', '.join(missing)}: they cannot be the best point")
    if result.get("privacy"):
        print(f"privacy of the sweep: {result['privacy']['statement']}")
    print(f"sweep.json: {sweep_dir / SWEEP_JSON}\nsweep.html: {sweep_dir / SWEEP_HTML}")


def _epsilon_text(p: dict) -> str:
    if "epsilon" not in p:
        return "—"
    if not p["private"]:
        return "inf (no DP)"
    return fmt_number(p["epsilon"])


# ---- sweep.html --------------------------------------------------------------------------
def render_sweep(
    sweep_dir: Path,
    axes: list[Axis],
    points: list[Point],
    metric: str,
    best: Point | None,
    config: str,
) -> str:
    done = [p for p in points if p.record]
    better = "lower" if lower_is_better(metric) else "higher"
    title = f"privdpo sweep: {sweep_dir.resolve().name}"
    shape = " × ".join(f"{a.key} ({len(a.texts)} values)" for a in axes)
    facts = (
        f"{len(points)} points: {shape}, from {config}. {len(done)} finished,"
        f" {len(points) - len(done)} pending. Metric: {metric} ({better} is better)."
    )
    if best is not None:
        facts += (
            f" Best point: {best.name}, {metric} = {fmt_number(best.record['metric'])},"
            f" epsilon {_epsilon_text(best.record)}."
        )
    missing = [p.name for p in done if not _finite(p.record["metric"])]
    note = ""
    if missing:
        note = (
            f'<p class="stop">{escape(metric)} is missing from {escape(", ".join(missing))}.'
            " A metric of eval.json (e.g. win_rate) is there only after `privdpo eval` on the"
            " point; then run the sweep again (finished points are reused).</p>"
        )
    when = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    body = [
        f'<section id="summary"><h2>At a glance</h2><p>{escape(facts)}</p>{note}</section>',
        f'<section id="points"><h2>Points</h2>{_points_table(axes, points, metric, best)}'
        "<p>Status: ran (trained in this invocation), resumed (continued from the checkpoint"
        " of an interrupted run), restarted (an earlier attempt left no checkpoint), reused"
        " (finished earlier; its files untouched), pending (not run yet).</p></section>",
        _figures_section(axes, done, metric, best),
        _privacy_section(points),
        _metrics_section(done),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}{SWEEP_CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="when">{escape(str(sweep_dir.resolve()))}<br>'
        f"written {escape(when)}</p>{''.join(body)}</body></html>\n"
    )


def _privacy_section(points: list[Point]) -> str:
    cost = sweep_privacy(points)
    if cost is None:
        return ""
    rows = [
        [
            g["unit"],
            ", ".join(g["points"]),
            ", ".join(s["recipe"] for s in g["earlier_stages"]) or "none",
            g["same_users"],
            fmt_number(g["epsilon"]),
            fmt_number(g["delta"]),
            g["accountant"],
        ]
        for g in cost["composed"]
    ]
    header = ["unit", "private points", "earlier stages composed", "users", "epsilon of the sweep"]
    table = html_table([*header, "delta", "accountant"], rows)
    return (
        f'<section id="privacy"><h2>Privacy of the sweep</h2><p>{escape(cost["statement"])}</p>'
        f"{table}</section>"
    )


SWEEP_CSS = """
tr.best td { background: #fff4c2; font-weight: 600; }
.scroll { overflow-x: auto; }
"""


def _points_table(axes: list[Axis], points: list[Point], metric: str, best: Point | None) -> str:
    header = ["point", *(a.key for a in axes), metric, "epsilon", "delta", "steps", "status"]
    header.append("best")
    rows = []
    for p in points:
        r = p.record or {}
        link = escape(p.name)
        if p.record and (p.run_dir / REPORT_FILE).is_file():
            link = f'<a href="{escape(p.name)}/{REPORT_FILE}">{escape(p.name)}</a>'
        cells = [link, *(escape(_value_text(a.key, p.values.get(a.key))) for a in axes)]
        cells += [escape(fmt_number(r.get("metric"))) if p.record else "—"]
        cells += [escape(_epsilon_text(r)), escape(fmt_number(r.get("delta")))]
        cells += [escape(fmt_number(r.get("steps"))), escape(p.status)]
        cells.append("★ best" if p is best else "")
        cls = ' class="best"' if p is best else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return (
        f'<div class="scroll"><table class="numbers"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _value_text(key: str, value) -> str:
    if key == EPSILON_KEY and value == math.inf:
        return "inf (no DP)"
    if isinstance(value, bool | list | dict) or value is None:
        return json.dumps(value)  # as YAML writes it: true, null, [0.9, 0.99]
    return fmt_number(value) if not isinstance(value, str) else value


def _metrics_section(done: list[Point]) -> str:
    if not done:
        return ""
    names = list(dict.fromkeys(k for p in done for k in _metric_names(p.record)))
    rows = []
    for name in names:
        cells = [
            p.record["final_metrics"].get(name, p.record["eval_metrics"].get(name)) for p in done
        ]
        rows.append([name, *cells])
    table = html_table(["metric", *(p.name for p in done)], rows, "numbers")
    return (
        '<section id="final-metrics"><h2>Final metrics of every point</h2>'
        "<p>The last logged value of each metric in metrics.jsonl, and the metrics of"
        f' eval.json where the point has one.</p><div class="scroll">{table}</div></section>'
    )


def _figures_section(axes: list[Axis], done: list[Point], metric: str, best: Point | None) -> str:
    scored = [p for p in done if _finite(p.record["metric"])]
    if not scored:
        return (
            '<section id="figures"><h2>Curves</h2><p>No finished point has a value of'
            f" {escape(metric)} yet.</p></section>"
        )
    better = "lower" if lower_is_better(metric) else "higher"
    star = f" The star marks the best point, {best.name}." if best else ""
    figures = []
    # The privacy-utility and beta curves first, then every other axis.
    ordered = sorted(axes, key=lambda a: (a.key != EPSILON_KEY, a.key != BETA_KEY))
    for axis in ordered:
        others = [a for a in axes if a is not axis]
        if axis.key == EPSILON_KEY:
            name, title = "privacy-utility", f"Privacy-utility: {metric} vs epsilon"
            alt = f"{metric} against epsilon spent, one line per {_keys(others)}"
            caption = (
                f"{better.capitalize()} is better. x: the epsilon each run spent (privacy.json),"
                f" log scale; the non-private points are drawn at the right edge, labelled no"
                f" DP.{star}"
            )
        else:
            name = "beta" if axis.key == BETA_KEY else f"axis-{axis.label}"
            title = f"{metric} vs {axis.key}"
            alt = f"{metric} against {axis.key}, one line per {_keys(others)}"
            caption = f"{better.capitalize()} is better.{star}"
        fig = _axis_figure(axis, others, scored, metric, best, title)
        figures.append(figure_img(name, alt, fig, escape(caption)))
    return (
        '<section id="figures"><h2>Curves</h2>'
        f'<div class="figures">{"".join(figures)}</div></section>'
    )


def _keys(axes: list[Axis]) -> str:
    return ", ".join(a.key for a in axes) if axes else "sweep (one line)"


def _line_label(point: Point, others: list[Axis]) -> str:
    parts = []
    for a in others:
        if a.key == EPSILON_KEY:
            text = point.texts[a.key]
            parts.append("no DP" if is_no_dp(text) else f"epsilon {text}")
        else:
            parts.append(f"{a.label}={point.texts[a.key]}")
    return ", ".join(parts) or "all points"


def _axis_figure(
    axis: Axis, others: list[Axis], points: list[Point], metric: str, best, title: str
) -> Figure:
    """`metric` against one axis, one line per combination of the other axes' values."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    x_of, ticks, log = _x_positions(axis, points)
    lines: dict[str, list[Point]] = {}
    for p in points:
        lines.setdefault(_line_label(p, others), []).append(p)
    for label, members in lines.items():
        members.sort(key=x_of)
        ax.plot(
            [x_of(p) for p in members],
            [p.record["metric"] for p in members],
            marker="o",
            markersize=4,
            label=label,
        )
    if best is not None and best in points:
        ax.scatter(
            [x_of(best)],
            [best.record["metric"]],
            marker="*",
            s=260,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"best: {best.name}",
        )
    if log:
        ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([t for t, _ in ticks], [text for _, text in ticks])
    if axis.key == EPSILON_KEY and len(ticks) > 1 and ticks[-1][1] == "no DP":
        # A break between the finite epsilons and the no-DP edge.
        ax.axvline(math.sqrt(ticks[-1][0] * ticks[-2][0]), color="grey", linestyle=":")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epsilon spent" if axis.key == EPSILON_KEY else axis.key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _x_positions(axis: Axis, points: list[Point]):
    """(x of a point, ticks as (position, label), log scale?) for one axis."""
    if axis.key == EPSILON_KEY:
        finite = [p.record["epsilon"] for p in points if _finite(p.record["epsilon"])]
        targets = [float(t) for t in axis.texts if not is_no_dp(t) and _number(t)]
        if not finite:
            return (lambda p: 1.0), [(1.0, "no DP")], False
        right = max(finite + targets) * 2.5  # where the non-private points are drawn
        ticks = [(t, fmt_number(t)) for t in sorted(set(targets)) if t > 0]
        if not ticks:
            ticks = [(e, fmt_number(e)) for e in sorted(set(finite))]
        if any(not _finite(p.record["epsilon"]) for p in points):
            ticks.append((right, "no DP"))
        return (
            (lambda p: p.record["epsilon"] if _finite(p.record["epsilon"]) else right),
            ticks,
            True,
        )
    values = [p.values[axis.key] for p in points]
    if all(_finite(v) for v in values):
        distinct = sorted(set(values))
        log = distinct[0] > 0 and distinct[-1] / distinct[0] > 4
        return (lambda p: p.values[axis.key]), [(v, fmt_number(v)) for v in distinct], log
    order = {t: i for i, t in enumerate(axis.texts)}  # not numbers: in the grid's order
    ticks = [(i, t) for t, i in order.items()]
    return (lambda p: order[p.texts[axis.key]]), ticks, False


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
