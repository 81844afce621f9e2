"""On-policy preference pairs: `privdpo pairs CONFIG [key=value ...]`.

How an SFT model and a local judge become DPO data. The model (a run directory or a model
directory, loaded as `privdpo eval` loads it) samples `num_samples` completions of every
prompt with one seeded generator; the judge (`judges.py`) scores them; per prompt:

- candidates are the completions with some non-blank text (a DPO pair needs text on both
  sides); a prompt with fewer than two is skipped (`skipped_blank`);
- chosen is the first candidate with the highest score, rejected the first with the lowest;
- equal scores are no preference: skipped (`skipped_ties`), whatever `min_score_gap`;
- a gap `chosen_score - rejected_score` below `min_score_gap` is skipped
  (`skipped_small_gap`); every other prompt gives one pair, or, with `pairs_per_prompt`
  "all", one pair for every two candidates whose scores differ by at least
  `min_score_gap` (and are not equal) and whose texts differ, the higher one chosen, in
  sampling order: up to n(n-1)/2 pairs from n samples, at no extra sampling cost.

Completions are the sampled tokens decoded with special tokens skipped and nothing else
changed (a trailing EOS is dropped; `privdpo dpo` appends its own). Rows keep the prompt
as it was given: text prompts give text rows {"prompt", "chosen", "rejected"}, chat prompts
chat rows (chosen and rejected each one assistant message). The prompt's user id is carried
over as "user_id", the default `data.user_id_column` of `privdpo dpo`, and both scores are
kept. Given the model, prompts, judge, seed and batch size, the pairs are the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging as hf_logging

from privdpo.config import PairsRunConfig
from privdpo.data.readers import read_rows
from privdpo.data.sft import user_id_of
from privdpo.data.tokenize import BadRow
from privdpo.errors import ConfigError, DataError, UserError
from privdpo.generation import eos_token_ids, generate
from privdpo.judges import Judge, load_judge
from privdpo.models import DTYPES
from privdpo.recipes.eval import load_source, policy_source, prompt_field, prompt_ids
from privdpo.training import pick_device

# ---------------------------------------------------------------------------------------
# Sampling, scoring, selecting: usable from Python without a config
# ---------------------------------------------------------------------------------------


@dataclass
class PromptSamples:
    """The sampled completions of one prompt with their judge scores, in sampling order.
    `finished[i]` is whether completion i ended at an EOS (else at `max_new_tokens`)."""

    prompt: str | list[dict]
    user_id: str | int | None
    completions: list[str]
    scores: list[float]
    finished: list[bool]


@dataclass
class PairsSummary:
    """What became of the prompts: each gives pairs or is skipped for one reason, so
    paired_prompts + skipped_small_gap + skipped_ties + skipped_blank == prompts."""

    prompts: int
    samples_per_prompt: int
    min_score_gap: float
    pairs: int = 0
    paired_prompts: int = 0
    skipped_small_gap: int = 0
    skipped_ties: int = 0
    skipped_blank: int = 0
    unfinished_samples: int = 0  # stopped by max_new_tokens rather than an EOS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.pairs} pairs from {self.paired_prompts} of {self.prompts} prompts x"
            f" {self.samples_per_prompt}"
            f" samples; skipped: {self.skipped_small_gap} gap < {self.min_score_gap:g},"
            f" {self.skipped_ties} ties, {self.skipped_blank} blank;"
            f" {self.unfinished_samples} samples cut at max_new_tokens"
        )

    def table(self) -> str:
        samples = self.prompts * self.samples_per_prompt
        return "\n".join(
            [
                f"  prompts              {self.prompts:>6}  ({self.samples_per_prompt} samples each)",
                f"  pairs                {self.pairs:>6}  (from {self.paired_prompts} prompts)",
                f"  skipped: small gap   {self.skipped_small_gap:>6}"
                f"  (best - worst < min_score_gap {self.min_score_gap:g})",
                f"  skipped: ties        {self.skipped_ties:>6}  (best and worst scored equal)",
                f"  skipped: blank       {self.skipped_blank:>6}"
                "  (fewer than two completions with text)",
                f"  unfinished samples   {self.unfinished_samples:>6}"
                f"  of {samples} (cut at max_new_tokens, no EOS)",
            ]
        )


def completion_text(tokenizer, ids: list[int], eos_ids: list[int]) -> str:
    """Sampled ids as text: a trailing EOS dropped, special tokens skipped, nothing else
    changed (no whitespace stripped, no tokenization-space clean-up)."""
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def sample_completions(
    model,
    tokenizer,
    prompts: list[dict],
    judge: Judge,
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[PromptSamples]:
    """`num_samples` scored completions of each prompt (rows {"prompt": text or chat
    messages, "user_id": optional}), in the order of `prompts`.

    All samples come from one `generate` call over each prompt repeated `num_samples`
    times, in batches of `batch_size` sequences: the same seed and batch size give the
    same samples. The judge sees text prompts as given and chat prompts rendered by the
    chat template with special tokens removed (as `privdpo eval` shows them).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 for a pair, got {num_samples}")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids = [prompt_ids(tokenizer, row["prompt"]) for row in prompts]
    sampled = generate(
        model,
        [p for p in ids for _ in range(num_samples)],
        pad_id=pad_id,
        eos_ids=eos_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    judged_prompts = [
        row["prompt"]
        if isinstance(row["prompt"], str)
        else tokenizer.decode(p, skip_special_tokens=True)
        for row, p in zip(prompts, ids, strict=True)
    ]
    texts = [completion_text(tokenizer, c, eos_ids) for c in sampled]
    scores = judge.score([p for p in judged_prompts for _ in range(num_samples)], texts)
    if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
        raise UserError(
            f"judge {judge.name}: must return one finite score per completion; got"
            f" {len(scores)} scores for {len(texts)} completions, or a NaN or infinity"
        )
    out = []
    for i, row in enumerate(prompts):
        part = slice(i * num_samples, (i + 1) * num_samples)
        out.append(
            PromptSamples(
                prompt=row["prompt"],
                user_id=row.get("user_id"),
                completions=texts[part],
                scores=[float(s) for s in scores[part]],
                finished=[bool(c) and c[-1] in eos_ids for c in sampled[part]],
            )
        )
    return out


def select_pairs(
    samples: list[PromptSamples], min_score_gap: float, pairs_per_prompt: str = "best_worst"
) -> tuple[list[dict], PairsSummary]:
    """The pair (best, worst) of each prompt whose scores differ by at least
    `min_score_gap` and are not equal, or with `pairs_per_prompt="all"` every such pair of
    its candidates; the rules are in the module docstring."""
    if pairs_per_prompt not in ("best_worst", "all"):
        raise ValueError(f"pairs_per_prompt must be best_worst or all, got {pairs_per_prompt!r}")
    summary = PairsSummary(
        prompts=len(samples),
        samples_per_prompt=len(samples[0].completions) if samples else 0,
        min_score_gap=min_score_gap,
    )
    rows = []
    for s in samples:
        summary.unfinished_samples += s.finished.count(False)
        candidates = [i for i, text in enumerate(s.completions) if text.strip()]
        if len(candidates) < 2:
            summary.skipped_blank += 1
            continue
        # max/min return the first of equal scores: the earliest sample wins a tie.
        best = max(candidates, key=lambda i: s.scores[i])
        worst = min(candidates, key=lambda i: s.scores[i])
        gap = s.scores[best] - s.scores[worst]
        if gap == 0 or s.completions[best] == s.completions[worst]:
            summary.skipped_ties += 1
        elif gap < min_score_gap:
            summary.skipped_small_gap += 1
        elif pairs_per_prompt == "best_worst":
            rows.append(pair_row(s, best, worst))
            summary.paired_prompts += 1
        else:
            found = [
                pair_row(s, i, j) if s.scores[i] > s.scores[j] else pair_row(s, j, i)
                for a, i in enumerate(candidates)
                for j in candidates[a + 1 :]
                if abs(s.scores[i] - s.scores[j]) >= min_score_gap
                and s.scores[i] != s.scores[j]
                and s.completions[i] != s.completions[j]
            ]
            rows += found
            summary.paired_prompts += 1  # found holds at least (best, worst)
    summary.pairs = len(rows)
    return rows, summary


def pair_row(s: PromptSamples, chosen: int, rejected: int) -> dict:
    """A preference row in a format `privdpo dpo` reads: text, or chat when the prompt is."""

    def response(text: str):
        return text if isinstance(s.prompt, str) else [{"role": "assistant", "content": text}]

    row = {
        "prompt": s.prompt,
        "chosen": response(s.completions[chosen]),
        "rejected": response(s.completions[rejected]),
    }
    if s.user_id is not None:
        row["user_id"] = s.user_id
    row["chosen_score"] = s.scores[chosen]
    row["rejected_score"] = s.scores[rejected]
    return row


def make_pairs(
    model,
    tokenizer,
    prompts: list[dict],
    judge: Judge,
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    min_score_gap: float,
    pairs_per_prompt: str = "best_worst",
) -> tuple[list[dict], PairsSummary]:
    """Preference rows {"prompt", "chosen", "rejected", "user_id" (when the prompt has
    one), "chosen_score", "rejected_score"} and what became of each prompt.

    `prompts` are rows {"prompt": text or chat messages, "user_id": optional}, e.g. from
    `read_prompt_rows` or `demo_corpus.review_prompts`.
    """
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        judge,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    return select_pairs(samples, min_score_gap, pairs_per_prompt)


def read_prompt_rows(path: str, user_id_column: str = "user_id") -> list[dict]:
    """Rows {"prompt", "user_id" (when the row has one)} of a local file; a bad row stops
    the run with its file:line."""
    rows = []
    for row in read_rows(path):
        prompt = prompt_field(row, "prompts.path")
        try:
            user_id = user_id_of(row.fields, user_id_column)
        except BadRow as e:
            raise DataError(f"{row.where}: prompts.user_id_column: {e}") from None
        out = {"prompt": prompt}
        if user_id is not None:
            out["user_id"] = row.fields[user_id_column]  # as given: text or an integer
        rows.append(out)
    return rows


def write_pairs(path: str | os.PathLike[str], rows: list[dict]) -> Path:
    """Write rows as JSONL (UTF-8, one object per line), atomically: the file is either
    the old one or the complete new one, never half written. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------


def run_pairs(cfg: PairsRunConfig) -> PairsSummary:
    """Sample, judge, select and write the pairs file; returns what became of the prompts."""
    # ---- setup: every user mistake we can see before loading the model ---------------
    problems: list[str] = []
    source, _ = policy_source(cfg.model.path, problems)
    output = Path(cfg.output.path).expanduser()
    if output.is_dir():
        problems.append(f"output.path: {output} is a directory; name the JSONL file to write")
    elif output.exists() and not cfg.output.overwrite:
        problems.append(
            f"output.path: {output} exists; set output.overwrite=true to replace it, or choose"
            " another path"
        )
    if problems:
        raise ConfigError(problems)
    prompts = read_prompt_rows(cfg.prompts.path, cfg.prompts.user_id_column)
    hf_logging.disable_progress_bar()
    g = cfg.generation
    device = pick_device(g.device)
    model, tokenizer = load_source(source, cfg.model, "model.path")
    model.to(device)
    judge = load_judge(cfg.judge, DTYPES[cfg.model.dtype], device)

    # ---- sample, judge, select ---------------------------------------------------------
    print(
        f"sampling {g.num_samples} completions of each of {len(prompts)} prompts from"
        f" {source.label}, judged by {judge.name}"
    )
    rows, summary = make_pairs(
        model,
        tokenizer,
        prompts,
        judge,
        num_samples=g.num_samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        batch_size=g.batch_size,
        seed=g.seed,
        min_score_gap=cfg.selection.min_score_gap,
        pairs_per_prompt=cfg.selection.pairs_per_prompt,
    )
    print(summary.table())
    if not rows:
        raise UserError(
            f"no pairs: all {summary.prompts} prompts were skipped, so {output} was not"
            " written; lower selection.min_score_gap, or raise generation.num_samples or"
            " generation.temperature for more varied samples"
        )

    # ---- output ------------------------------------------------------------------------
    write_pairs(output, rows)
    print(f"wrote {summary.pairs} pairs to {output}")
    return summary
