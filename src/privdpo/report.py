"""The HTML report of a run: `privdpo report RUN_DIR`, written as `RUN_DIR/report.html`.

One self-contained file a person can open from disk: CSS inline, figures as base64 PNG data
URIs (matplotlib's Agg canvas, no pyplot state), no script, no external URL. It reads only
what the run directory holds (config.yaml, metrics.jsonl, data_summary.json, inspect.json,
scrub_summary.json, privacy.json, stopped_early.txt, checkpoints/best/best.json, eval.json) and shows each part only when its
file is there. Every number a figure shows that matters is also written as text, and all
text from the run (config, prompts, generations) is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from privdpo.errors import UserError
from privdpo.metrics import METRICS_FILE, read_metrics

REPORT_FILE = "report.html"
MAX_LOCATIONS_SHOWN = 3  # file:line examples per data-summary reason
MAX_SAMPLES_SHOWN = 20

# Training-curve figures: (data-figure name, title, metrics drawn on one axis). A figure
# is drawn when at least one of its metrics was logged. Learning rate is `learning_rate`
# in today's recipes; `lr` is accepted too.
CURVE_GROUPS: list[tuple[str, str, tuple[str, ...]]] = [
    ("loss", "Training loss", ("loss",)),
    ("rewards-accuracies", "Reward accuracy (chosen reward > rejected)", ("rewards/accuracies",)),
    ("rewards-margins", "Reward margin (chosen - rejected)", ("rewards/margins",)),
    ("rewards", "Implicit rewards of chosen and rejected", ("rewards/chosen", "rewards/rejected")),
    ("logps", "Log-probabilities of chosen and rejected", ("logps/chosen", "logps/rejected")),
    ("grad-norm", "Gradient norm", ("grad_norm",)),
    ("learning-rate", "Learning rate", ("learning_rate", "lr")),
    ("throughput", "Throughput (tokens per second)", ("tokens_per_second",)),
    ("privacy-epsilon", "Privacy spent (epsilon)", ("privacy/epsilon",)),
]
NOT_PLOTTED = {"step", "epoch"}  # epoch is a rescaled step

UNIT_NOUNS = {"example": "training example", "pair": "preference pair", "user": "user"}

# Labels of privacy.json's keys in the numbers table; unknown keys are shown by name.
PRIVACY_LABELS = {
    "unit": "privacy unit",
    "level": "level",
    "epsilon": "epsilon, end to end (for the users it covers)",
    "stage_epsilon": "epsilon of this run alone",
    "delta": "delta",
    "user_algorithm": "user-level algorithm",
    "contribution_bound": "contribution bound k (most examples or pairs per user)",
    "contribution_bound_chosen_by": "how k was chosen",
    "users": "users",
    "units_kept": "units kept",
    "units_dropped": "units dropped (beyond the contribution bound)",
    "group_privacy_epsilon": "epsilon by group privacy (loose, for comparison)",
    "algorithm": "algorithm",
    "accountant": "accountant",
    "neighbouring": "neighbouring datasets",
    "sampling": "sampling",
    "sampling_rate": "sampling rate q",
    "clipping_norm": "clipping norm C",
    "noise_multiplier": "noise multiplier sigma",
    "steps": "steps",
    "dataset_size": "units in the training set (N)",
    "secure_noise": "cryptographically secure noise",
    "accountant_settings": "accountant settings",
}
# Shown in their own parts of the section, not in the numbers table.
PRIVACY_NOT_TABULATED = {"summary", "ledger", "end_to_end", "units_per_user_histogram", "private"}


# ---- entry points ------------------------------------------------------------------------
def main_report(run_dir: str) -> Path:
    """`privdpo report RUN_DIR`: write the report and say where it is."""
    path = write_report(Path(run_dir))
    print(f"report: {path}")
    return path


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` from what the run directory holds; return its path."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    html = render_report(run_dir)
    path = run_dir / REPORT_FILE
    tmp = path.with_name(f".tmp-{REPORT_FILE}")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)  # never a half-written report
    return path


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(
            f"report: {run_dir} is not a directory; pass the output.dir of a privdpo run"
        )
    missing = [n for n in ("config.yaml", METRICS_FILE) if not (run_dir / n).is_file()]
    if missing:
        raise UserError(
            f"report: {run_dir} is not a privdpo run directory (no {' or '.join(missing)});"
            " pass the output.dir of a `privdpo sft` or `privdpo dpo` run"
        )


# ---- reading the run directory -----------------------------------------------------------
def _read_json(path: Path):
    """The parsed file, or None when it is absent; a broken file is a UserError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"report: {path} is not valid JSON ({e}); fix or remove it") from None


def _read_metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except json.JSONDecodeError as e:
        raise UserError(
            f"report: {run_dir / METRICS_FILE} holds a line that is not JSON ({e}); a run"
            " killed mid-write leaves one: `--resume` the run or delete that last line"
        ) from None


def run_kind(config: dict) -> str:
    """dpo when the resolved config has a `dpo` section, else sft."""
    return "dpo" if isinstance(config.get("dpo"), dict) else "sft"


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; non-finite and non-numeric values are left out."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        steps.append(r["step"])
        values.append(float(v))
    return steps, values


def last_value(records: list[dict], key: str) -> tuple[int, float] | None:
    steps, values = series(records, key)
    return (steps[-1], values[-1]) if steps else None


# ---- formatting --------------------------------------------------------------------------
def fmt_number(x) -> str:
    """Short text of a number: 4 significant digits, 1e-05 written 1e-5, inf as infinity."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isinf(x):
            return "infinity" if x > 0 else "-infinity"
        if math.isnan(x):
            return "nan"
        text = f"{x:.4g}"
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    return str(x)


def _cell(x) -> str:
    return escape(fmt_number(x) if not isinstance(x, str) else x)


def html_table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    """A table of escaped cells; no header row when `header` is None."""
    head = ""
    if header is not None:
        head = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>{head}<tbody>{body}</tbody></table>"


def _in_order(keys, known: list[str]) -> list[str]:
    """Distinct keys, those in `known` first in its order, then the rest as they came."""
    seen = list(dict.fromkeys(keys))
    return [k for k in known if k in seen] + [k for k in seen if k not in known]


def _when(path: Path) -> str:
    stamp = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).astimezone()
    return stamp.isoformat(timespec="seconds")


# ---- figures -----------------------------------------------------------------------------
def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # An opaque white background (the report test relies on it to tell a cut-short PNG),
    # and no Software tag: nothing in the file names a URL.
    fig.savefig(
        buf,
        format="png",
        dpi=100,
        bbox_inches="tight",
        facecolor="white",
        transparent=False,
        metadata={"Software": None},
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_img(name: str, alt: str, fig: Figure, caption: str = "", wide: bool = False) -> str:
    """A figure as an <img> with a PNG data URI; `caption` is HTML (escaped by the caller)."""
    data = _png(fig)
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><img data-figure="{escape(name)}" alt="{escape(alt)}"'
        f' src="data:image/png;base64,{data}">{cap}</figure>'
    )


def _markers(ax, marks: list[tuple[int, str, str]]) -> None:
    for step, label, color in marks:
        ax.axvline(step, color=color, linestyle="--", linewidth=1, label=label)


def _curve_figure(
    records: list[dict], keys: list[str], title: str, marks: list[tuple[int, str, str]]
) -> Figure:
    fig = Figure(figsize=(6.4, 3.0))
    ax = fig.add_subplot()
    for key in keys:
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    _markers(ax, marks)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _small_multiples(
    panels: list[tuple[str, list[float], list[float]]],
    xlabel: str,
    marks: list[tuple[int, str, str]],
    title: str,
) -> Figure:
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows))
    fig.suptitle(title)
    for i, (key, xs, ys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(xs, ys, marker="o", markersize=3)
        _markers(ax, marks)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def reward_kl_points(
    evaluation: dict,
    label: str = "policy (trained)",
    include_reference: bool = True,
    include_best_of_n: bool = True,
) -> list[dict]:
    """The points of `reward_kl_figure` that an eval.json holds: the evaluated model at its
    KL to the reference (the exact estimate `kl_exact` when present, else the one-sample
    `kl_to_reference`) and its mean judge reward; the reference at KL 0; and best-of-n of
    the reference at its KL bound log n - (n-1)/n. (Best-of-n of the evaluated model is
    left out: its bound is to that model, not to the reference.) Empty without rewards."""
    metrics = evaluation.get("metrics") or {}
    reward, ref_reward = metrics.get("policy_reward"), metrics.get("reference_reward")
    kl = metrics.get("kl_exact") or metrics.get("kl_to_reference")
    if not isinstance(reward, dict) or not isinstance(kl, dict) or not _finite(kl.get("value")):
        return []
    points = [
        {
            "label": label,
            "kl": kl["value"],
            "kl_ci": (kl.get("ci_low"), kl.get("ci_high")),
            "reward": reward,
            "series": label,
        }
    ]
    if include_reference and isinstance(ref_reward, dict):
        points.append(
            {"label": "reference", "kl": 0.0, "reward": ref_reward, "series": "reference"}
        )
    if include_best_of_n:
        for row in evaluation.get("best_of_n") or []:
            if isinstance(row, dict) and row.get("model") == "reference":
                points.append(
                    {
                        "label": f"best-of-{row['n']}",
                        "kl": row["kl_bound"],
                        "reward": row["reward"],
                        "series": "best-of-n of the reference",
                        "kl_is_bound": True,
                    }
                )
    return points


def reward_kl_figure(
    points: list[dict],
    title: str = "Reward vs KL to the reference",
    reward_label: str = "mean judge reward",
) -> Figure:
    """Mean reward (with its interval) against KL to the reference, one marker per point.

    points: dicts {"label", "kl" (nats per sequence), "reward": {"value", "ci_low",
    "ci_high"}}, optionally "kl_ci" (low, high) drawn as a horizontal bar, "series" (the
    points of one series share a colour and are joined in order of KL) and "kl_is_bound"
    (a hollow marker: the KL is an upper bound, e.g. best-of-n's log n - (n-1)/n).
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    series: dict[str, list[dict]] = {}
    for p in points:
        series.setdefault(p.get("series") or p["label"], []).append(p)
    colors = [f"C{i}" for i in range(10)]
    for i, (name, group) in enumerate(series.items()):
        group = sorted(group, key=lambda p: p["kl"])
        color = colors[i % len(colors)]
        xs = [p["kl"] for p in group]
        ys = [p["reward"]["value"] for p in group]
        if len(group) > 1:
            ax.plot(xs, ys, color=color, linewidth=1, alpha=0.6)
        for p, x, y in zip(group, xs, ys, strict=True):
            r = p["reward"]
            yerr = None
            if r.get("ci_low") is not None and r.get("ci_high") is not None:
                yerr = [[y - r["ci_low"]], [r["ci_high"] - y]]
            xerr = None
            low, high = p.get("kl_ci") or (None, None)
            if low is not None and high is not None:
                xerr = [[max(0.0, x - low)], [max(0.0, high - x)]]
            bound = bool(p.get("kl_is_bound"))
            ax.errorbar(
                [x],
                [y],
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                color=color,
                markerfacecolor="white" if bound else color,
                markersize=6,
                capsize=3,
                label=name if p is group[0] else None,
            )
            text = f"{p['label']} (KL ≤ {x:.2f})" if bound else p["label"]
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("KL to the reference, nats per sequence")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


# ---- sections ----------------------------------------------------------------------------
def _privacy_sentence(p: dict) -> str:
    """The guarantee in one plain sentence (plain text, not yet escaped), e.g. "Each user's
    data influences this model by at most epsilon = 7.98, delta = 1e-5, under ULS with
    k = 4 (user-level DP-SGD, dp-accounting PLD)."."""
    unit = str(p.get("unit", "unit"))
    noun = UNIT_NOUNS.get(unit, unit)
    level = p.get("level") or f"{unit}-level"
    how = [f"{level} DP-SGD"]
    if p.get("accountant"):
        how.append(str(p["accountant"]))
    algorithm = ""
    if p.get("user_algorithm"):
        algorithm = f", under {str(p['user_algorithm']).upper()}"
        if p.get("contribution_bound") is not None:
            algorithm += f" with k = {fmt_number(p['contribution_bound'])}"
    end = p.get("end_to_end") or {}
    who = f"Each {noun}'s data"
    if end.get("no_guarantee"):
        who = f"The data of each {noun} of this run other than those named below"
    relative = ""
    if end.get("relative_to_starting_model"):
        relative = f", relative to the starting model {end['relative_to_starting_model']}"
    return (
        f"{who} influences this model by at most"
        f" epsilon = {fmt_number(p.get('epsilon'))}, delta = {fmt_number(p.get('delta'))}"
        f"{algorithm} ({', '.join(how)}){relative}."
    )


def _privacy_meaning(p: dict) -> str:
    """What the numbers mean, as HTML."""
    unit = str(p.get("unit", "unit"))
    noun = escape(UNIT_NOUNS.get(unit, unit))
    eps = p.get("epsilon")
    text = (
        f"In plain terms: anything that can be learned from the model (its weights or its"
        f" outputs) is almost as likely whether or not any single {noun}'s data was used."
    )
    if _finite(eps):
        text += (
            f" The probability of any outcome changes by at most a factor of"
            f" e<sup>epsilon</sup> = {escape(fmt_number(math.exp(min(eps, 700))))}, except with"
            f" probability delta = {escape(fmt_number(p.get('delta')))}. Smaller epsilon is"
            " stronger protection."
        )
    if unit == "user" and p.get("contribution_bound") is not None:
        text += (
            f" Each user contributed at most k = {escape(fmt_number(p['contribution_bound']))}"
            " of their rows (examples or pairs) to training;"
        )
        dropped = p.get("units_dropped")
        text += (
            f" the other {escape(fmt_number(dropped))} rows were left out."
            if dropped is not None
            else " any other rows were left out."
        )
    if p.get("group_privacy_epsilon") is not None:
        text += (
            " For comparison, the loose group-privacy bound would give epsilon ="
            f" {escape(fmt_number(p['group_privacy_epsilon']))}."
        )
    elif "group_privacy_epsilon" in p:
        text += " For comparison, the loose group-privacy bound gives no finite epsilon."
    return text


def privacy_section(run_dir: Path, config: dict, records: list[dict]) -> str:
    statement = _read_json(run_dir / "privacy.json")
    enabled = bool((config.get("privacy") or {}).get("enabled"))
    if statement is None:
        if not enabled:
            return (
                '<section id="privacy"><h2>Privacy</h2><p class="statement none">This run was'
                " trained without differential privacy (privacy.enabled was false): it"
                " carries no formal privacy guarantee.</p></section>"
            )
        spent = last_value(records, "privacy/epsilon")
        so_far = (
            f" The last logged epsilon was {escape(fmt_number(spent[1]))} at step {spent[0]}."
            if spent
            else ""
        )
        return (
            '<section id="privacy"><h2>Privacy</h2><p class="statement warn">This run was'
            " private, but privacy.json is missing: the run did not finish, so no final"
            f" statement was written.{so_far}</p></section>"
        )
    if not isinstance(statement, dict):
        raise UserError(f"report: {run_dir / 'privacy.json'} must hold a JSON object")
    eps = statement.get("epsilon")
    if statement.get("private") is False or eps is None or not _finite(eps):
        sentence = (
            "This model has NO formal privacy guarantee: epsilon is infinite (noise"
            f" multiplier {escape(fmt_number(statement.get('noise_multiplier')))})."
        )
        meaning = ""
    else:
        sentence = escape(_privacy_sentence(statement))
        meaning = f'<p class="meaning">{_privacy_meaning(statement)}</p>'
    known = [k for k in PRIVACY_LABELS if k in statement]
    other = [k for k in statement if k not in PRIVACY_LABELS and k not in PRIVACY_NOT_TABULATED]
    rows = [[PRIVACY_LABELS.get(k, k), _exact(statement[k])] for k in known + other]
    recorded = ""
    if statement.get("summary"):
        recorded = (
            '<p class="recorded">Statement recorded by the run:'
            f" <q>{escape(str(statement['summary']))}</q></p>"
        )
    return (
        '<section id="privacy"><h2>Privacy guarantee</h2>'
        f'<p class="statement">{sentence}</p>{meaning}{_coverage(statement)}'
        f"{_contributions(statement, 'pairs' if run_kind(config) == 'dpo' else 'examples')}"
        f"<h3>Exact numbers</h3>{html_table(['quantity', 'value'], rows, 'numbers')}{recorded}"
        "</section>"
    )


def _coverage(p: dict) -> str:
    """What the end-to-end bound covers: the earlier stages composed or on other users,
    the users it does not cover (as warnings), the starting model it is relative to."""
    end = p.get("end_to_end")
    if not end:
        return ""
    items = []
    stage = p.get("stage_epsilon")
    if end.get("composition") == "sequential":
        names = ", ".join(_stage_name(s) for s in end.get("composed_stages", []))
        items.append(
            f"End to end over this run and {escape(names)} (sequential composition of every"
            f" stage's steps in {escape(str(end.get('accountant')))}): epsilon ="
            f" {escape(fmt_number(end.get('epsilon')))}; this run alone: epsilon ="
            f" {escape(fmt_number(stage))}."
        )
    elif end.get("composition") == "parallel":
        names = ", ".join(_stage_name(s) for s in end.get("parallel_stages", []))
        items.append(
            f"End to end: the same epsilon. {escape(names)} trained on other users (no overlap"
            " by salted hash of the user ids): parallel composition."
        )
    else:
        items.append("End to end: the same epsilon; no earlier stage used private data.")
    warnings = [
        f'<p class="statement warn">{escape(s["reason"][0].upper() + s["reason"][1:])}.</p>'
        for s in end.get("no_guarantee", [])
    ]
    if end.get("relative_to_starting_model"):
        items.append(
            f"Relative to the starting model {escape(str(end['relative_to_starting_model']))},"
            " which privdpo did not train: what it learned before is not covered."
        )
    return "".join(warnings) + "".join(f'<p class="coverage">{t}</p>' for t in items)


def _stage_name(stage: dict) -> str:
    where = f" ({stage['run_dir']})" if stage.get("run_dir") else ""
    return f"the {stage.get('recipe')} stage{where}"


def _contributions(p: dict, units: str) -> str:
    """The per-user histogram of `units` ("pairs" or "examples") before the bound k, and
    how many were used (user level)."""
    histogram = p.get("units_per_user_histogram")
    if not histogram:
        return ""
    counts = sorted((int(c), int(n)) for c, n in histogram.items())
    k = p.get("contribution_bound")
    fig = Figure(figsize=(6.4, 2.6))
    ax = fig.add_subplot()
    ax.bar([str(c) for c, _ in counts], [n for _, n in counts], color="#4c72b0")
    ax.set_xlabel(f"{units} per user (before the bound)")
    ax.set_ylabel("users")
    ax.set_title(f"Contributions per user (bound k = {k})")
    used, dropped = p.get("units_kept"), p.get("units_dropped")
    total = sum(c * n for c, n in counts)
    caption = escape(
        f"{fmt_number(p.get('users'))} users; {fmt_number(used)} of {fmt_number(total)} {units}"
        f" used for training (at most k = {fmt_number(k)} per user), {fmt_number(dropped)}"
        " left out."
    )
    table = html_table([f"{units} per user", "users"], [[c, n] for c, n in counts], "numbers")
    return (
        "<h3>Contributions per user</h3>"
        + figure_img("contributions", f"histogram of {units} per user", fig, caption)
        + table
    )


def audit_section(run_dir: Path) -> str:
    """`privdpo audit`'s result: the two epsilons side by side, the guesses, and the score
    histograms of included and excluded canaries."""
    audit = _read_json(run_dir / "audit.json")
    if audit is None:
        return ""
    proven = audit.get("proven_epsilon")
    bound = audit.get("empirical_epsilon_lower_bound")
    verdict = (
        '<p class="statement warn">The empirical lower bound is ABOVE the proven epsilon: the'
        " implementation leaks more than its accounting allows. Do not trust this run's"
        " privacy statement.</p>"
        if audit.get("exceeds_proven")
        else ""
    )
    rows = [
        ["proven epsilon", "not private" if proven is None else fmt_number(proven)],
        [
            f"empirical lower bound ({fmt_number(audit.get('confidence'))} confidence)",
            fmt_number(bound),
        ],
        [
            f"attainable with these {audit.get('guesses')} guesses (all right)",
            fmt_number(audit.get("attainable_with_chosen_guesses")),
        ],
        [
            f"max attainable (all {audit.get('evaluated')} evaluated canaries guessed right)",
            fmt_number(audit.get("max_attainable")),
        ],
        ["canaries (evaluated half)", f"{audit.get('canaries')} ({audit.get('evaluated')})"],
        ["guesses in / out", f"{audit.get('k_in')} / {audit.get('k_out')}"],
        ["correct guesses", f"{audit.get('correct')} of {audit.get('guesses')}"],
        *[[k, str(v)] for k, v in (audit.get("design") or {}).items()],
    ]
    scores, included = audit.get("scores") or [], audit.get("included") or []
    figure = ""
    if scores:
        fig = Figure(figsize=(6.4, 2.8))
        ax = fig.add_subplot()
        inside = [s for s, i in zip(scores, included, strict=True) if i]
        outside = [s for s, i in zip(scores, included, strict=True) if not i]
        ax.hist(
            [inside, outside], bins=30, label=["included", "excluded"], color=["#c44e52", "#4c72b0"]
        )
        ax.set_xlabel("canary score")
        ax.set_ylabel("canaries")
        ax.set_title("Canary scores")
        ax.legend()
        figure = figure_img(
            "audit-scores", "histograms of canary scores, included and excluded", fig
        )
    return (
        '<section id="audit"><h2>Privacy audit</h2><p class="statement warn">This is an'
        " audit run: its model was trained with canaries. Do not ship it.</p>"
        f"{verdict}{html_table(['quantity', 'value'], rows, 'numbers')}{figure}</section>"
    )


def _exact(x) -> str:
    """A number in full (repr) for the exact-numbers table; other values as text."""
    if isinstance(x, float) and math.isfinite(x):
        return repr(x)
    if isinstance(x, dict | list):
        return json.dumps(x)
    return fmt_number(x) if not isinstance(x, str) else x


def _stop_marks(run_dir: Path, records: list[dict]) -> tuple[list[tuple[int, str, str]], str]:
    """Vertical markers (best checkpoint, early stop) and the text saying why."""
    marks, notes = [], []
    best = _read_json(run_dir / "checkpoints" / "best" / "best.json")
    if isinstance(best, dict) and isinstance(best.get("step"), int):
        metric = ", ".join(f"{k} = {fmt_number(v)}" for k, v in best.items() if k != "step")
        marks.append((best["step"], f"best checkpoint (step {best['step']})", "tab:green"))
        notes.append(
            f"The best evaluation (kept in checkpoints/best and exported) was at step"
            f" {best['step']}{': ' + metric if metric else ''}."
        )
    stopped = run_dir / "stopped_early.txt"
    if stopped.is_file():
        reason = stopped.read_text(encoding="utf-8").strip()
        last = max((r["step"] for r in records), default=0)
        marks.append((last, f"stopped early (step {last})", "tab:red"))
        notes.append(f"Training stopped early at step {last}. Reason: {reason}")
    text = "".join(f'<p class="stop">{escape(n)}</p>' for n in notes)
    return marks, text


def curves_section(run_dir: Path, records: list[dict]) -> str:
    train = [r for r in records if not any(k.startswith("eval/") for k in r)]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    marks, stop_text = _stop_marks(run_dir, records)
    figures, drawn = [], set()
    for name, title, keys in CURVE_GROUPS:
        present = [k for k in keys if series(train, k)[0]]
        drawn.update(keys)
        if not present:
            continue
        fig = _curve_figure(train, present, title, marks)
        caption = "; ".join(_last_text(train, k) for k in present)
        figures.append(figure_img(name, f"{title} by step ({', '.join(present)})", fig, caption))
    known = [f"eval/{k}" for _, _, keys in CURVE_GROUPS for k in keys]
    eval_keys = _in_order((k for r in evals for k in r if k.startswith("eval/")), known)
    eval_panels = [(k, *series(evals, k)) for k in eval_keys if series(evals, k)[0]]
    if eval_panels:
        fig = _small_multiples(eval_panels, "step", marks, "Held-out evaluation")
        caption = "; ".join(_last_text(evals, k) for k, _, _ in eval_panels)
        alt = f"Held-out evaluation metrics by step ({', '.join(k for k, _, _ in eval_panels)})"
        figures.append(figure_img("eval", alt, fig, caption, wide=True))
    others = sorted({k for r in train for k in r} - drawn - NOT_PLOTTED)
    other_panels = [(k, *series(train, k)) for k in others if series(train, k)[0]]
    if other_panels:
        fig = _small_multiples(other_panels, "step", marks, "Other logged metrics")
        caption = "; ".join(_last_text(train, k) for k, _, _ in other_panels)
        alt = f"Other logged metrics by step ({', '.join(k for k, _, _ in other_panels)})"
        figures.append(figure_img("other", alt, fig, caption, wide=True))
    if not figures:
        body = "<p>No metrics were logged yet.</p>"
    else:
        body = f'<div class="figures">{"".join(figures)}</div>'
    return (
        f'<section id="curves"><h2>Training curves</h2>{stop_text}{body}'
        f"<h3>Final values</h3>{_final_table(records)}</section>"
    )


def _last_text(records: list[dict], key: str) -> str:
    last = last_value(records, key)
    if last is None:
        return ""
    return f"last {escape(key)} = {escape(fmt_number(last[1]))} at step {last[0]}"


def _final_table(records: list[dict]) -> str:
    keys = sorted({k for r in records for k in r} - NOT_PLOTTED)
    rows = []
    for k in keys:
        steps, values = series(records, k)
        if steps:
            rows.append([k, steps[-1], values[-1], min(values), max(values)])
    if not rows:
        return "<p>No numeric metrics.</p>"
    return html_table(["metric", "last step", "last value", "min", "max"], rows, "numbers")


def data_section(run_dir: Path) -> str:
    summary = _read_json(run_dir / "data_summary.json")
    if not isinstance(summary, dict):
        return '<section id="data"><h2>Data</h2><p>No data_summary.json in this run.</p></section>'
    read = summary.get("rows_read") or {}
    kept = summary.get("kept") or {}
    dropped = summary.get("dropped") or {}
    notes = summary.get("notes") or {}
    total_read = sum(v for v in read.values() if isinstance(v, int))
    total_kept = sum(v for v in kept.values() if isinstance(v, int))
    total_dropped = sum(e.get("count", 0) for e in dropped.values() if isinstance(e, dict))
    parts = [
        '<section id="data"><h2>Data</h2>',
        f'<p class="totals">Rows read: {total_read}. Kept: {total_kept}. Dropped:'
        f" {total_dropped}.</p>",
    ]
    if read:
        parts.append(html_table(["file", "rows read"], [[f, n] for f, n in read.items()]))
    if kept:
        parts.append(html_table(["split", "rows kept"], [[s, n] for s, n in kept.items()]))
    for title, table in (("Dropped rows", dropped), ("Kept rows that were changed", notes)):
        if not table:
            continue
        rows = []
        for reason, entry in table.items():
            entry = entry if isinstance(entry, dict) else {}
            where = list(entry.get("rows") or [])
            shown = ", ".join(str(w) for w in where[:MAX_LOCATIONS_SHOWN])
            if entry.get("count", 0) > len(where[:MAX_LOCATIONS_SHOWN]):
                shown += ", …"
            rows.append([reason, entry.get("count"), str(entry.get("detail", "")), shown])
        parts.append(f"<h3>{escape(title)}</h3>")
        parts.append(html_table(["reason", "rows", "detail", "examples (file:line)"], rows))
    if not dropped:
        parts.append("<p>No row was dropped.</p>")
    parts.append("</section>")
    return "".join(parts)


def inspect_section(run_dir: Path) -> str:
    """The data inspection (inspect.json) and, when the data was scrubbed on load, what
    the scrubber replaced (scrub_summary.json): counts only."""
    from privdpo.prep.inspect import inspection_rows

    inspection = _read_json(run_dir / "inspect.json")
    scrub = _read_json(run_dir / "scrub_summary.json")
    if not isinstance(inspection, dict) and not isinstance(scrub, dict):
        return ""
    parts = ['<section id="inspect"><h2>Data inspection</h2>']
    if isinstance(inspection, dict):
        parts.append(html_table(["measure", "value"], inspection_rows(inspection), "numbers"))
        found = inspection.get("problems") or []
        if found:
            items = "".join(f"<li>{escape(str(p))}</li>" for p in found)
            parts.append(f'<p class="stop">Problems found:</p><ul>{items}</ul>')
        else:
            parts.append("<p>No problem found.</p>")
    if isinstance(scrub, dict):
        parts.append(
            f"<h3>Personal identifiers scrubbed on load</h3><p>{escape(str(scrub.get('ner')))}."
            f" Rows touched: {escape(fmt_number(scrub.get('rows_touched')))} of"
            f" {escape(fmt_number(scrub.get('rows')))}.</p>"
        )
        totals = scrub.get("totals") or {}
        if totals:
            parts.append(html_table(["entity", "replaced"], [[k, v] for k, v in totals.items()]))
    parts.append("</section>")
    return "".join(parts)


def eval_section(evaluation: dict | None) -> str:
    if evaluation is None:
        return ""
    parts = ['<section id="eval"><h2>Evaluation</h2>']
    facts = [[k, evaluation[k]] for k in ("model", "reference") if evaluation.get(k) is not None]
    if facts:
        parts.append(html_table(None, [[k, str(v)] for k, v in facts]))
    metrics = evaluation.get("metrics")
    if isinstance(metrics, dict) and metrics:
        rows = []
        for name, m in metrics.items():
            if isinstance(m, dict):
                lo, hi = m.get("ci_low"), m.get("ci_high")
                ci = "—" if lo is None or hi is None else f"[{fmt_number(lo)}, {fmt_number(hi)}]"
                rows.append([name, m.get("value"), ci])
            else:
                rows.append([name, m, "—"])
        parts.append("<h3>Metrics</h3>")
        parts.append(html_table(["metric", "value", "confidence interval"], rows, "numbers"))
        if "kl_exact" in metrics:
            parts.append(
                "<p>KL to the reference, in nats per sequence, two estimates from the same"
                " samples of the model (temperature 1): <code>kl_to_reference</code>, the"
                " one-sample log-ratio log pi(y|x) - log pi_ref(y|x); <code>kl_exact</code>,"
                " the exact next-token KL summed along each sample (same expectation, lower"
                " variance); <code>kl_exact_per_token</code> is the latter per generated"
                " token.</p>"
            )
    best = [b for b in evaluation.get("best_of_n") or [] if isinstance(b, dict)]
    if best:
        parts.append(_best_of_n(best))
    points = reward_kl_points(evaluation)
    if len(points) > 1:
        parts.append(
            figure_img(
                "reward-kl",
                "mean judge reward against KL to the reference: the model, the reference"
                + (" and best-of-n of the reference" if best else ""),
                reward_kl_figure(points),
                escape(
                    f"The model's KL is {'kl_exact' if 'kl_exact' in metrics else 'kl_to_reference'}"
                    " with its interval; bars are the rewards' intervals. Best-of-n points"
                    " (hollow) stand at their KL bound, an upper bound."
                ),
            )
        )
    sweep = evaluation.get("temperature_sweep")
    if isinstance(sweep, list) and sweep:
        parts.append(_sweep(sweep))
    forgetting = evaluation.get("forgetting")
    if isinstance(forgetting, dict) and forgetting:
        parts.append("<h3>Forgetting</h3>")
        scalars = [[k, v] for k, v in forgetting.items() if not isinstance(v, dict | list)]
        parts.append(html_table(["quantity", "value"], scalars))
        for block in forgetting.get("classification") or []:
            if isinstance(block, dict):
                parts.append(_classification(block))
    parts.append("</section>")
    return "".join(parts)


def _interval(m) -> str:
    """'value [low, high]' of an Estimate's dict; '—' when there is none (undefined)."""
    if not isinstance(m, dict) or m.get("value") is None:
        return "—"
    text = fmt_number(m["value"])
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        text += f" [{fmt_number(m['ci_low'])}, {fmt_number(m['ci_high'])}]"
    return text


def _best_of_n(rows: list[dict]) -> str:
    cells = [
        [
            str(r.get("model")),
            r.get("n"),
            _interval(r.get("reward")),
            _interval(r.get("win_rate")),
            r.get("kl_bound"),
        ]
        for r in rows
    ]
    return (
        "<h3>Best-of-n</h3><p>Per prompt, n completions sampled from the model named, the"
        " one the judge scores highest kept. Win rate over the reference's single samples;"
        " the KL bound log n - (n-1)/n (nats per sequence) is to the model sampled from.</p>"
        + html_table(
            ["sampled from", "n", "mean reward [CI]", "win rate vs reference [CI]", "KL bound"],
            cells,
            "numbers",
        )
    )


def _classification(block: dict) -> str:
    classes = [str(c) for c in block.get("classes") or []]
    after, before = block.get("policy") or {}, block.get("reference") or {}
    rows = []
    for c, name in enumerate(classes):
        a = (after.get("per_class") or [{}] * len(classes))[c]
        b = (before.get("per_class") or [{}] * len(classes))[c]
        rows.append(
            [
                name,
                *(_interval(side.get(k)) for k in ("precision", "recall", "f1") for side in (a, b)),
                a.get("support"),
            ]
        )
    overall = [
        [label, _interval(after.get(key)), _interval(before.get(key))]
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1"))
    ]
    header = [
        "class",
        "precision after",
        "precision before",
        "recall after",
        "recall before",
        "F1 after",
        "F1 before",
        "support",
    ]
    title = ", ".join(repr(c) for c in classes)
    return (
        f"<h4>Classification over {escape(title)} ({escape(fmt_number(block.get('tasks')))}"
        " tasks): after DPO (the model) and before (the reference); — where undefined (no"
        " precision for a class never predicted)</h4>"
        + html_table(header, rows, "numbers")
        + html_table(["over all classes", "after", "before"], overall, "numbers")
    )


def _sweep(sweep: list) -> str:
    points = [p for p in sweep if isinstance(p, dict) and _finite(p.get("temperature"))]
    points.sort(key=lambda p: p["temperature"])
    keys = _in_order(
        (k for p in points for k in p if k != "temperature" and _finite(p[k])), ["win_rate"]
    )
    html = "<h3>Temperature sweep</h3>"
    panels = []
    for k in keys:
        xs = [p["temperature"] for p in points if _finite(p.get(k))]
        ys = [p[k] for p in points if _finite(p.get(k))]
        panels.append((k, xs, ys))
    if panels:
        fig = _small_multiples(panels, "temperature", [], "Sampling temperature sweep")
        html += figure_img("temperature-sweep", f"{', '.join(keys)} by sampling temperature", fig)
    columns = _in_order((k for p in points for k in p), ["temperature", *keys])
    rows = [
        [p.get(c) if not isinstance(p.get(c), dict | list) else str(p.get(c)) for c in columns]
        for p in points
    ]
    return html + html_table(columns, rows, "numbers")


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def samples_section(evaluation: dict | None) -> str:
    samples = (evaluation or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        return ""
    shown = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES_SHOWN]
    parts = ['<section id="samples"><h2>Sample generations</h2>']
    if len(samples) > len(shown):
        parts.append(f"<p>The first {len(shown)} of {len(samples)} samples.</p>")
    for i, s in enumerate(shown, 1):
        parts.append(
            f'<div class="sample"><h3>Sample {i}</h3>'
            f'<pre class="prompt">{escape(str(s.get("prompt", "")))}</pre>'
            '<div class="pair">'
            f"{_generation('policy (trained)', s.get('policy'), s.get('policy_score'))}"
            f"{_generation('reference', s.get('reference'), s.get('reference_score'))}"
            "</div></div>"
        )
    parts.append("</section>")
    return "".join(parts)


def _generation(title: str, text, score) -> str:
    score_text = "" if score is None else f" — score {escape(fmt_number(score))}"
    return (
        f'<div class="generation"><h4>{escape(title)}{score_text}</h4>'
        f"<pre>{escape('' if text is None else str(text))}</pre></div>"
    )


def config_section(config_text: str) -> str:
    return (
        '<section id="config"><h2>Resolved config</h2>'
        f'<pre class="config">{escape(config_text)}</pre></section>'
    )


def summary_section(kind: str, config: dict, records: list[dict]) -> str:
    """The run at a glance: the numbers a reader looks for first."""
    rows = [["run kind", kind.upper()]]
    steps = [r["step"] for r in records if "loss" in r]
    if steps:
        rows.append(["steps trained", max(steps)])
    for key in ("loss", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies"):
        last = last_value(records, key)
        if last is not None:
            rows.append([f"final {key} (step {last[0]})", last[1]])
    spent = last_value(records, "privacy/epsilon")
    if spent is not None:
        rows.append([f"epsilon spent (step {spent[0]})", spent[1]])
    model = config.get("model") or {}
    rows.append(["model", str(model.get("path") or f"preset {model.get('preset')}")])
    if kind == "dpo":
        dpo = config.get("dpo") or {}
        rows.append(["loss, beta", f"{dpo.get('loss')}, {fmt_number(dpo.get('beta'))}"])
    return f'<section id="summary"><h2>At a glance</h2>{html_table(None, rows)}</section>'


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
  color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } .when { color: #555; margin-top: 0; }
section { margin: 2em 0; }
.statement { font-size: 1.15em; padding: 0.8em 1em; background: #eef5ee;
  border-left: 4px solid #2e7d32; }
.statement.none { background: #f2f2f2; border-left-color: #777; }
.statement.warn { background: #fdf3e7; border-left-color: #e65100; }
.stop { padding: 0.4em 0.8em; background: #fdf3e7; border-left: 4px solid #e65100; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.numbers td:not(:first-child) { font-variant-numeric: tabular-nums; }
figure { margin: 0; } figure img { max-width: 100%; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr));
  gap: 1.2em; margin: 1em 0; }
.figures figure.wide { grid-column: 1 / -1; }
figcaption { font-size: 0.9em; color: #444; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.6em;
  border: 1px solid #e4e4e4; }
.pair { display: flex; gap: 1em; } .generation { flex: 1 1 0; min-width: 0; }
.generation h4 { margin: 0.3em 0; }
"""


def render_report(run_dir: Path) -> str:
    """The report's HTML text (`write_report` saves it)."""
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"report: {run_dir / 'config.yaml'} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"report: {run_dir / 'config.yaml'} must be a mapping of sections")
    records = _read_metrics(run_dir)
    evaluation = _read_json(run_dir / "eval.json")
    if evaluation is not None and not isinstance(evaluation, dict):
        raise UserError(f"report: {run_dir / 'eval.json'} must hold a JSON object")
    kind = run_kind(config)
    title = f"privdpo {kind.upper()} run: {run_dir.resolve().name}"
    when = (
        f"Started {_when(run_dir / 'config.yaml')}; last metrics written"
        f" {_when(run_dir / METRICS_FILE)}; report written"
        f" {datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds')}."
    )
    body = "".join(
        [
            privacy_section(run_dir, config, records),  # the guarantee comes first
            audit_section(run_dir),
            summary_section(kind, config, records),
            curves_section(run_dir, records),
            data_section(run_dir),
            inspect_section(run_dir),
            eval_section(evaluation),
            samples_section(evaluation),
            config_section(config_text),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="when">{escape(str(run_dir.resolve()))}<br>'
        f"{escape(when)}</p>{body}</body></html>\n"
    )
