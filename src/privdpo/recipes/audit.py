"""`privdpo audit CONFIG [key=value ...]`: the configured training run with canaries, and
an empirical lower bound on epsilon next to the proven one.

The run is the config's own (same model, data, unit and privacy settings) plus m canaries,
each included with probability 1/2 (`privacy/audit.py`):
- black box: canary examples (SFT) or pairs (DPO) whose prompt carries a random
  identifier and whose (chosen) response is a random secret of the data's rarest tokens
  (Panda et al. 2025, "Privacy Auditing of Large Language Models": rare-token canaries
  audit far better than random text); at user level, canary users with several canary
  items each. A canary's score is the log-likelihood gain of its secret over the starting
  model (SFT) or its implicit reward margin against the starting model (DPO), summed over
  a canary user's items;
- white box: gradient canaries inside DP-SGD (`GradientCanaries`).
The audit run's directory and exported model are marked at export (`AUDIT_RUN.txt`, see
`privdpo.models.AUDIT_MARKER`) and the model loader refuses them; canaries exist only in
audit runs. `audit.json` holds the result; the report gets an audit section. A
bound above the proven epsilon is a bug in the implementation: the command fails.
"""

from __future__ import annotations

import collections
import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch

from privdpo.config import AuditSection, DPORunConfig, SFTRunConfig, build_config, read_config_file
from privdpo.data.batching import example_batch, pair_batch
from privdpo.data.preference import PairExample
from privdpo.data.sft import Example
from privdpo.data.tokenize import IGNORE
from privdpo.errors import UserError
from privdpo.logprobs import sequence_logps
from privdpo.privacy.audit import GradientCanaries, choose_and_bound, inclusion


class Canaries:
    """What an audit injects into a run: canary items (black box) or gradient canaries
    (white box), and their inclusion."""

    def __init__(self, audit, kind: str, unit: str | None):
        self.audit = audit
        self.kind = kind  # "sft" or "dpo"
        self.unit = unit
        self.included = inclusion(audit.canaries, audit.seed)
        self.items: list[list] = []  # per canary, its items (black box)
        self.gradient: GradientCanaries | None = None

    def training_items(self, train: list, tokenizer) -> list:
        """The included canaries' items, built once the training data is known (their
        secrets are drawn from its rarest tokens)."""
        if self.audit.mode != "black_box":
            return []
        rare = rare_tokens(train, tokenizer)
        rng = random.Random(f"privdpo-audit-canaries-{self.audit.seed}")
        with_ids = bool(train) and all(it.user_id is not None for it in train)
        per = self.audit.items_per_user if self.unit == "user" else 1
        for c in range(self.audit.canaries):
            user = f"audit-canary-{c:05d}" if (with_ids or self.unit == "user") else None
            self.items.append([self._item(c, j, rng, rare, tokenizer, user) for j in range(per)])
        return [it for c, items in enumerate(self.items) if self.included[c] for it in items]

    def _item(self, c, j, rng, rare, tokenizer, user):
        ident = "".join(rng.choice("0123456789abcdef") for _ in range(8))
        prompt = tokenizer(f"Record {ident}:", add_special_tokens=True)["input_ids"]
        secret = [rng.choice(rare) for _ in range(self.audit.secret_tokens)]
        where = f"audit-canary:{c}:{j}"
        if self.kind == "sft":
            return Example(prompt + secret, [IGNORE] * len(prompt) + secret, where, user)
        other = [rng.choice(rare) for _ in range(self.audit.secret_tokens)]
        return PairExample(prompt, secret, other, where, user)

    def attach(self, dp, model) -> None:
        """White box: give DP-SGD the gradient canaries (over its trainable parameters)."""
        if self.audit.mode == "white_box":
            self.gradient = GradientCanaries(dp.clipper.params, self.included, self.audit.seed)
            dp.canaries = self.gradient


def rare_tokens(train: list, tokenizer) -> list[int]:
    """The rarest quarter (at least 64) of the vocabulary in the training data, specials
    excluded: the tokens a secret is drawn from."""
    counts = collections.Counter()
    for it in train:
        if hasattr(it, "prompt_ids"):
            counts.update(it.prompt_ids + it.chosen_ids + it.rejected_ids)
        else:
            counts.update(it.input_ids)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    vocab.sort(key=lambda t: (counts[t], t))
    return vocab[: max(64, len(vocab) // 4)]


@torch.no_grad()
def black_box_scores(
    canaries: Canaries, policy, start, pad_id: int, device, items_per_batch: int = 64
) -> list[float]:
    """Each canary's score (see the module doc), summed over its items; the items are
    scored in packed batches of `items_per_batch`."""
    flat = [(c, item) for c, items in enumerate(canaries.items) for item in items]
    scores = [0.0] * len(canaries.items)
    for s in range(0, len(flat), items_per_batch):
        part = flat[s : s + items_per_batch]
        items = [item for _, item in part]
        if canaries.kind == "sft":
            batch = example_batch(items, pad_id).to(device)
            gains = sequence_logps(policy, batch)[0] - sequence_logps(start, batch)[0]
        else:  # sequences: every chosen response, then every rejected one
            batch = pair_batch(items, pad_id).to(device)
            lp, ref = sequence_logps(policy, batch)[0], sequence_logps(start, batch)[0]
            chosen, rejected = (lp - ref).chunk(2)
            gains = chosen - rejected
        for (c, _), gain in zip(part, gains.tolist(), strict=True):
            scores[c] += gain
    return scores


def run_scores(
    canaries: Canaries, run_dir: Path, dtype: str, device: str, audit_model_ok: bool
) -> list[float]:
    """Black box: the canaries scored on the model `run_dir` exported, against the model
    the run started from, both on `device` (a `train.device` value)."""
    from privdpo.config import EvalModelConfig
    from privdpo.recipes.eval import _run_reference, load_source, policy_source
    from privdpo.training import pick_device

    problems: list[str] = []
    source, run = policy_source(str(run_dir), problems)
    if problems:
        raise UserError("; ".join(problems))
    model_cfg = EvalModelConfig(path=str(run_dir), dtype=dtype)
    policy, tokenizer = load_source(source, model_cfg, "model.path", audit_model_ok)
    start, _ = load_source(_run_reference(run_dir, run), model_cfg, "reference.path")
    target = pick_device(device)
    policy.to(target)
    start.to(target)
    return black_box_scores(canaries, policy, start, tokenizer.pad_token_id, target)


def run_audit(config_path: str, overrides: list[str]) -> dict:
    raw = read_config_file(config_path)
    audit_raw = raw.pop("audit", {}) or {}
    run_overrides = [o for o in overrides if not o.startswith("audit.")]
    audit_overrides = [o for o in overrides if o.startswith("audit.")]
    audit = build_config(AuditSection, {"audit": audit_raw}, audit_overrides).audit
    is_dpo = "dpo" in raw
    cfg = build_config(DPORunConfig if is_dpo else SFTRunConfig, raw, run_overrides)
    if audit.mode == "white_box" and not cfg.privacy.enabled:
        raise UserError(
            "audit.mode: white_box puts gradient canaries inside DP-SGD; this config has"
            " privacy.enabled=false. Use audit.mode=black_box, or turn privacy on"
        )
    unit = None
    if cfg.privacy.enabled:
        unit = "user" if cfg.privacy.unit == "user" else ("pair" if is_dpo else "example")
    canaries = Canaries(audit, "dpo" if is_dpo else "sft", unit)
    from privdpo.recipes.dpo import run_dpo
    from privdpo.recipes.sft import run_sft

    print(
        f"audit: {audit.canaries} {audit.mode.replace('_', '-')} canaries"
        f"{' (users)' if unit == 'user' else ''}, each in the data with probability 1/2"
    )
    exported = (run_dpo if is_dpo else run_sft)(cfg, audit=canaries)
    run_dir = Path(cfg.output.dir)
    if audit.mode == "white_box":
        scores = canaries.gradient.scores
    else:
        scores = run_scores(
            canaries, run_dir, cfg.model.dtype, cfg.train.device, audit_model_ok=True
        )
    statement = _read(run_dir / "privacy.json")
    proven = statement.get("epsilon") if statement else None
    delta = statement["delta"] if statement else 1e-5
    result = choose_and_bound(scores, canaries.included, delta, audit.seed, audit.confidence)
    out = {
        "proven_epsilon": proven,
        "proven_delta": statement["delta"] if statement else None,
        "empirical_epsilon_lower_bound": result.epsilon_lower_bound,
        "exceeds_proven": proven is not None and result.epsilon_lower_bound > proven,
        **asdict(result),
        "design": {
            "mode": audit.mode,
            "unit": unit or "(not private)",
            "canaries": audit.canaries,
            "inclusion": "each canary independently with probability 1/2, seeded",
            "score": _score_text(canaries),
            "secret_tokens": audit.secret_tokens if audit.mode == "black_box" else None,
            "items_per_canary": len(canaries.items[0]) if canaries.items else None,
            "seed": audit.seed,
            "guess_selection": "k+ and k- chosen on a seeded half of the canaries, bound on the other half",
            "bound": "Steinke, Nasr and Jagielski 2023, Theorem 5.2 (with delta)",
        },
        "scores": scores,
        "included": canaries.included,
    }
    text = json.dumps(out, indent=2, allow_nan=False) + "\n"
    for d in [run_dir, *exported.values()]:  # already marked at export
        (d / "audit.json").write_text(text, encoding="utf-8")
    from privdpo.report import write_report

    print(f"report: {write_report(run_dir)}")
    print(audit_table(out))
    if out["exceeds_proven"]:
        raise UserError(
            f"audit: the empirical lower bound epsilon >= {result.epsilon_lower_bound:.3g}"
            f" ({audit.confidence:.0%} confidence) is above the proven epsilon = {proven:.4g}:"
            " the implementation leaks more than its accounting allows. This is a bug; do not"
            " trust this run's privacy statement"
        )
    return out


def _score_text(canaries: Canaries) -> str:
    if canaries.audit.mode == "white_box":
        return "sum over steps of the privatized gradient sum at the canary's coordinate"
    if canaries.kind == "sft":
        return "log-likelihood gain of the secret over the starting model"
    return "implicit reward margin (policy vs starting model, chosen minus rejected)"


def audit_table(out: dict) -> str:
    proven = out["proven_epsilon"]
    rows = [
        (
            "proven epsilon",
            "not private" if proven is None else f"{proven:.4g} (delta {out['proven_delta']:.3g})",
        ),
        (
            f"empirical lower bound ({out['confidence']:.0%})",
            f"{out['empirical_epsilon_lower_bound']:.3g}",
        ),
        (
            f"attainable with these {out['guesses']} guesses",
            f"{out['attainable_with_chosen_guesses']:.3g}",
        ),
        (
            f"max attainable (all {out['evaluated']} guessed right)",
            f"{out['max_attainable']:.3g}",
        ),
        ("canaries (evaluated half)", f"{out['canaries']} ({out['evaluated']})"),
        ("guesses in / out", f"{out['k_in']} / {out['k_out']}"),
        ("correct guesses", f"{out['correct']} of {out['guesses']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "audit:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
