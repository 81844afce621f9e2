"""`privdpo inspect DATA`: what is in preference (or SFT) data, before it trains a model.

Computed from the loaded data (the loader's own tokenization, truncation and summary, so
every number is about what training would see): length bias, exact and near-duplicate
prompts, prompts shared by the train and eval splits, contradictory pairs (A over B and B
over A for one prompt), chosen equal to rejected, empty or truncated responses at
`data.max_length`, and the histogram of pairs per user, the input to the contribution
bound. User ids are counted, never written. Every training run writes the same
`inspect.json` into its run directory, and its report shows it.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from privdpo.config import (
    DPORunConfig,
    InspectConfig,
    InspectRunConfig,
    SFTRunConfig,
    load_config,
    read_yaml,
)
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import IGNORE

INSPECT_FILE = "inspect.json"
MIN_PAIRS_FOR_BIAS = 20  # fewer pairs of differing lengths say nothing about a bias
SHINGLE = 3  # near-duplicates: Jaccard similarity of token 3-grams
MINHASH_BANDS, MINHASH_ROWS = 16, 4  # candidates from 16 bands of 4 MinHash values
_PRIME = 4294967291  # the largest prime below 2**32: (a * x + b) % p fits in uint64
_COEFFS = np.random.default_rng(0).integers(1, _PRIME, size=(2, MINHASH_BANDS * MINHASH_ROWS))


# ---- the measures ------------------------------------------------------------------------
def _shingles(ids: tuple[int, ...]) -> np.ndarray:
    # hash() of a tuple of ints is the same in every process (only str hashing is salted).
    grams = {hash(ids[i : i + SHINGLE]) for i in range(max(1, len(ids) - SHINGLE + 1))}
    return np.fromiter((g & 0xFFFFFFFF for g in grams), dtype=np.uint64, count=len(grams))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(prompts: list[tuple[int, ...]], threshold: float) -> list[tuple[int, int]]:
    """Index pairs of distinct `prompts` whose token 3-gram sets have Jaccard similarity at
    least `threshold`: MinHash LSH proposes candidates, the exact Jaccard decides. Each
    prompt is compared with the first member of every bucket it shares (linear, not
    quadratic, in a bucket's size)."""
    a, b = (c.astype(np.uint64)[:, None] for c in _COEFFS)
    grams = [_shingles(p) for p in prompts]
    buckets: dict[tuple, int] = {}
    candidates: set[tuple[int, int]] = set()
    for i, g in enumerate(grams):
        signature = ((a * g[None, :] + b) % _PRIME).min(axis=1)
        for band in range(MINHASH_BANDS):
            key = (band, *signature[band * MINHASH_ROWS : (band + 1) * MINHASH_ROWS].tolist())
            first = buckets.setdefault(key, i)
            if first != i:
                candidates.add((first, i))
    sets = {}
    found = []
    for i, j in sorted(candidates):
        si = sets.setdefault(i, set(grams[i].tolist()))
        sj = sets.setdefault(j, set(grams[j].tolist()))
        if _jaccard(si, sj) >= threshold:
            found.append((i, j))
    return found


def prompt_overlap(
    train: list[tuple[int, ...]], evals: list[tuple[int, ...]], threshold: float
) -> dict:
    """Exact and near duplicates among prompts, and prompts shared by the two splits."""
    counts = Counter(train + evals)
    distinct = list(counts)
    in_train, in_eval = set(train), set(evals)
    near = near_duplicates(distinct, threshold)
    near_prompts = {i for pair in near for i in pair}
    crossing = [
        (i, j)
        for i, j in near
        if (distinct[i] in in_train and distinct[j] in in_eval)
        or (distinct[i] in in_eval and distinct[j] in in_train)
    ]
    shared = in_train & in_eval
    return {
        "exact": {
            "prompts_repeated": sum(1 for n in counts.values() if n > 1),
            "extra_rows": sum(n - 1 for n in counts.values() if n > 1),
        },
        "near": {"pairs": len(near), "prompts": len(near_prompts), "threshold": threshold},
        "train_eval": {
            "eval_prompts": len(in_eval),
            "shared_exact": len(shared),
            "near_across_splits": len(crossing),
        },
    }


def length_bias(pairs: list) -> dict:
    """Share of pairs whose chosen response is longer (in tokens), and the mean difference."""
    diffs = [len(p.chosen_ids) - len(p.rejected_ids) for p in pairs]
    longer, shorter = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    differing = longer + shorter
    n = max(1, len(diffs))
    return {
        "pairs": len(diffs),
        "chosen_longer": longer / n,
        "rejected_longer": shorter / n,
        "equal_length": (len(diffs) - differing) / n,
        "chosen_longer_of_differing": longer / differing if differing else None,
        "mean_difference_tokens": statistics.fmean(diffs) if diffs else 0.0,
        "mean_chosen_tokens": statistics.fmean(len(p.chosen_ids) for p in pairs) if pairs else 0,
        "mean_rejected_tokens": statistics.fmean(len(p.rejected_ids) for p in pairs)
        if pairs
        else 0,
    }


def contradictions(pairs: list) -> dict:
    """Prompts with both (A over B) and (B over A), and how many such opposed pairs."""
    by_prompt: dict[tuple, set] = defaultdict(set)
    for p in pairs:
        by_prompt[tuple(p.prompt_ids)].add((tuple(p.chosen_ids), tuple(p.rejected_ids)))
    opposed, prompts = 0, 0
    for prefs in by_prompt.values():
        here = sum(1 for c, r in prefs if (r, c) in prefs) // 2
        opposed += here
        prompts += here > 0
    return {"prompts": prompts, "opposed_pairs": opposed}


def users_histogram(items: list) -> dict:
    """How many users have 1, 2, ... rows: counts only, never an id."""
    per_user = Counter(it.user_id for it in items if it.user_id is not None)
    counts = sorted(per_user.values())
    histogram = Counter(counts)
    return {
        "users": len(counts),
        "rows_without_user_id": sum(1 for it in items if it.user_id is None),
        "median_rows_per_user": statistics.median(counts) if counts else None,
        "max_rows_per_user": counts[-1] if counts else None,
        "histogram": {str(k): histogram[k] for k in sorted(histogram)},
    }


def _dropped(summary: DataSummary, *reasons: str) -> int:
    return sum(summary.dropped.get(r, {}).get("count", 0) for r in reasons)


def _noted(summary: DataSummary, reason: str) -> int:
    return summary.notes.get(reason, {}).get("count", 0)


def _sft_prompt(example) -> tuple[int, ...]:
    """An SFT example's prompt: its tokens before the first label (all of a text row)."""
    start = next((i for i, lab in enumerate(example.labels) if lab != IGNORE), None)
    return tuple(example.input_ids[:start] if start else example.input_ids)


# ---- the report --------------------------------------------------------------------------
def inspect_pairs(
    train: list, evals: list, summary: DataSummary, max_length: int, cfg: InspectConfig = None
) -> dict:
    """inspect.json of preference pairs (`PairExample`s as the loader kept them)."""
    cfg = cfg or InspectConfig()
    everything = train + evals
    overlap = prompt_overlap(
        [tuple(p.prompt_ids) for p in train],
        [tuple(p.prompt_ids) for p in evals],
        cfg.near_duplicate_threshold,
    )
    triples = Counter(
        (tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in everything
    )
    result = {
        "kind": "preference",
        "rows": {"train": len(train), "eval": len(evals)},
        "max_length": max_length,
        "length_bias": length_bias(everything),
        "prompts": overlap,
        "duplicate_pairs": sum(n - 1 for n in triples.values() if n > 1),
        "contradictions": contradictions(everything),
        "chosen_equals_rejected": _dropped(summary, "identical_pair")
        + sum(1 for p in everything if p.chosen_ids == p.rejected_ids),
        "empty_responses": _dropped(summary, "empty_field", "missing_field"),
        "truncated": _noted(summary, "truncated") + _dropped(summary, "too_long"),
        "users": users_histogram(train),
    }
    result["problems"] = problems(result, cfg)
    return result


def inspect_examples(
    train: list, evals: list, summary: DataSummary, max_length: int, cfg: InspectConfig = None
) -> dict:
    """inspect.json of SFT examples: what applies without pairs (no length bias or
    contradictions)."""
    cfg = cfg or InspectConfig()
    overlap = prompt_overlap(
        [_sft_prompt(e) for e in train],
        [_sft_prompt(e) for e in evals],
        cfg.near_duplicate_threshold,
    )
    result = {
        "kind": "sft",
        "rows": {"train": len(train), "eval": len(evals)},
        "max_length": max_length,
        "prompts": overlap,
        "empty_responses": _dropped(summary, "empty_field", "missing_field"),
        "truncated": _noted(summary, "truncated") + _dropped(summary, "too_long"),
        "users": users_histogram(train),
    }
    result["problems"] = problems(result, cfg)
    return result


def problems(r: dict, cfg: InspectConfig) -> list[str]:
    """One sentence per problem found; an empty list for clean data."""
    out = []
    bias = r.get("length_bias")
    if bias and bias["chosen_longer_of_differing"] is not None:
        differing = round(bias["pairs"] * (1 - bias["equal_length"]))
        share = bias["chosen_longer_of_differing"]
        if differing >= MIN_PAIRS_FOR_BIAS and max(share, 1 - share) > cfg.length_bias_threshold:
            which = "longer" if share > 0.5 else "shorter"
            out.append(
                f"length bias: chosen is {which} than rejected in {max(share, 1 - share):.0%}"
                f" of the {differing} pairs of differing length (mean difference"
                f" {bias['mean_difference_tokens']:+.1f} tokens); DPO learns length as"
                " preference: balance the data or use a length-normalized loss"
                " (dpo.loss=dpo_norm or simpo)"
            )
    exact, near, cross = r["prompts"]["exact"], r["prompts"]["near"], r["prompts"]["train_eval"]
    if exact["prompts_repeated"]:
        out.append(
            f"duplicate prompts: {exact['prompts_repeated']} prompts appear more than once"
            f" ({exact['extra_rows']} extra rows)"
        )
    if near["pairs"]:
        out.append(
            f"near-duplicate prompts: {near['pairs']} pairs of distinct prompts are at least"
            f" {near['threshold']:.0%} alike (token 3-grams)"
        )
    if cross["shared_exact"] or cross["near_across_splits"]:
        out.append(
            f"train/eval overlap: {cross['shared_exact']} eval prompts also in train, and"
            f" {cross['near_across_splits']} near-duplicates across the splits; evaluation on"
            " them measures memory, not preference: deduplicate before splitting"
        )
    if r.get("duplicate_pairs"):
        out.append(f"duplicate pairs: {r['duplicate_pairs']} rows repeat a whole pair")
    contra = r.get("contradictions")
    if contra and contra["opposed_pairs"]:
        out.append(
            f"contradictory pairs: {contra['opposed_pairs']} pairs are opposed by another pair"
            f" of the same prompt (A over B and B over A, {contra['prompts']} prompts); they"
            " cap reward accuracy: drop them or use a noise-robust loss (dpo.loss=robust)"
        )
    if r.get("chosen_equals_rejected"):
        out.append(
            f"chosen equals rejected: {r['chosen_equals_rejected']} pairs carry no preference"
        )
    if r["empty_responses"]:
        out.append(f"empty responses: {r['empty_responses']} rows have an empty or missing field")
    if r["truncated"]:
        out.append(f"truncated: {r['truncated']} rows do not fit data.max_length={r['max_length']}")
    return out


def inspection_rows(r: dict) -> list[tuple[str, str]]:
    """(measure, value) rows of the report, for the table and the run's HTML report."""
    rows = [("rows", f"{r['rows']['train']} train, {r['rows']['eval']} eval")]
    bias = r.get("length_bias")
    if bias:
        rows += [
            ("chosen longer", f"{bias['chosen_longer']:.1%} of {bias['pairs']} pairs"),
            ("rejected longer", f"{bias['rejected_longer']:.1%}"),
            ("mean length chosen - rejected", f"{bias['mean_difference_tokens']:+.2f} tokens"),
        ]
    p = r["prompts"]
    rows += [
        (
            "duplicate prompts (exact)",
            f"{p['exact']['prompts_repeated']} ({p['exact']['extra_rows']} extra rows)",
        ),
        ("near-duplicate prompt pairs", f"{p['near']['pairs']} (>= {p['near']['threshold']})"),
        ("eval prompts also in train", f"{p['train_eval']['shared_exact']}"),
        ("near-duplicates across splits", f"{p['train_eval']['near_across_splits']}"),
    ]
    if "contradictions" in r:
        rows += [
            ("contradictory pairs", f"{r['contradictions']['opposed_pairs']}"),
            ("duplicate pairs", f"{r['duplicate_pairs']}"),
            ("chosen equals rejected", f"{r['chosen_equals_rejected']}"),
        ]
    u = r["users"]
    hist = ", ".join(f"{k}: {v}" for k, v in list(u["histogram"].items())[:8])
    more = ", ..." if len(u["histogram"]) > 8 else ""
    rows += [
        ("empty or missing responses", f"{r['empty_responses']}"),
        (f"truncated at max_length={r['max_length']}", f"{r['truncated']}"),
        ("users", f"{u['users']} ({u['rows_without_user_id']} rows without a user id)"),
        ("users by rows per user", f"{{{hist}{more}}}" if hist else "-"),
    ]
    return rows


def inspection_table(r: dict) -> str:
    """The report as aligned `measure  value` lines, problems last."""
    rows = inspection_rows(r)
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append("problems:" if r["problems"] else "problems: none found")
    lines += [f"  - {p}" for p in r["problems"]]
    return "\n".join(lines)


def save_inspection(inspection: dict, directory: Path) -> Path:
    path = Path(directory) / INSPECT_FILE
    path.write_text(json.dumps(inspection, indent=2) + "\n", encoding="utf-8")
    return path


# ---- the command -------------------------------------------------------------------------
def _inspect_config(data: str, overrides: list[str]) -> tuple[InspectRunConfig, str | None]:
    """The config of `privdpo inspect DATA`, and the kind (dpo/sft) when DATA is a run's
    YAML config: then its model, data and split, with `inspect.*` overrides on top."""
    if Path(data).suffix.lower() not in (".yaml", ".yml"):
        # DATA as a JSON string is a YAML string whatever its characters.
        return load_config(
            InspectRunConfig, None, [f"data.train={json.dumps(data)}", *overrides]
        ), None
    kind = "dpo" if "dpo" in read_yaml(data) else "sft"
    ours = [o for o in overrides if o.startswith("inspect.")]
    run = load_config(
        DPORunConfig if kind == "dpo" else SFTRunConfig,
        data,
        [o for o in overrides if not o.startswith("inspect.")],
    )
    cfg = load_config(InspectRunConfig, None, [f"data.train={json.dumps(run.data.train)}", *ours])
    cfg.model, cfg.data = run.model, run.data
    return cfg, kind


def _tokenizer(cfg: InspectRunConfig):
    from privdpo.models import PRESETS, build_tiny_tokenizer, load_tokenizer

    if cfg.model.path or cfg.model.tokenizer_path:
        return load_tokenizer(cfg.model), cfg.model.tokenizer_path or cfg.model.path
    preset = cfg.model.preset or "tiny"
    return build_tiny_tokenizer(PRESETS[preset]["vocab_size"]), f"preset {preset}"


def _is_preference(path: str) -> bool:
    from privdpo.data.readers import read_rows

    for row in read_rows(path):
        if row.fields is not None:
            return bool({"chosen", "rejected"} & row.fields.keys())
    return True


def run_inspect(data: str, overrides: list[str]) -> dict:
    """`privdpo inspect DATA`: load DATA as training would (bad rows are counted, not
    fatal), print the table and write inspect.json."""
    from privdpo.data.preference import load_preference_data
    from privdpo.data.sft import load_sft_data

    cfg, kind = _inspect_config(data, overrides)
    # Inspection reports bad rows instead of stopping at the first.
    cfg.data.on_bad_row, cfg.data.identical_pairs = "drop", "drop"
    tokenizer, origin = _tokenizer(cfg)
    if kind is None:
        kind = "dpo" if _is_preference(cfg.data.train) else "sft"
    if kind == "dpo":
        train, evals, summary = load_preference_data(cfg.data, tokenizer, 0)
        result = inspect_pairs(train, evals, summary, cfg.data.max_length, cfg.inspect)
    else:
        train, evals, summary = load_sft_data(cfg.data, tokenizer, True, 0)
        result = inspect_examples(train, evals, summary, cfg.data.max_length, cfg.inspect)
    result["tokenizer"] = origin
    out = Path(cfg.inspect.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    splits = f"{cfg.data.train}" + (f" and {cfg.data.eval}" if cfg.data.eval else "")
    print(f"inspect {splits} ({result['kind']}, tokens of {origin}):")
    print(inspection_table(result))
    print(f"wrote {out}")
    return result
