"""Evaluation: `privdpo eval CONFIG [key=value ...]`.

A trained model (a run directory or a model directory) against its reference policy, on
local data, with a local judge:

1. Held-out preferences. Per pair, the implicit DPO reward margin
   m = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]
   (Rafailov et al. 2023, eq. 5 and 7); `preference_accuracy` is the fraction with m > 0
   (an exact tie, e.g. a model evaluated against itself, is not correct: the same rule as
   the training metric `eval/rewards/accuracies` and TRL), `mean_margin` the mean of m.
2. Generation. Completions of held-out prompts by the model and by the reference, sampled
   with one seed (the same random numbers for both, which lowers the variance of their
   comparison).
3. KL to the reference, two estimates from the same samples y ~ pi(.|x) of the model,
   drawn at temperature 1 and top_p 1 and scored at temperature 1. `kl_to_reference`: the
   mean one-sample log-ratio log pi(y|x) - log pi_ref(y|x), summed over the sampled
   tokens (`generation.sequence_kl`). `kl_exact`: the mean over y of the exact
   next-token KL sum_v pi(v|x, y_<t) log(pi(v|x, y_<t) / pi_ref(v|x, y_<t)) summed over
   y's positions (`generation.exact_sequence_kl`): the same expectation, far lower
   variance. Both in nats per sequence; `kl_exact_per_token` is the exact KL summed over
   all completions divided by their tokens.
4. Win rate. The judge scores both completions of each prompt; a higher score is a win
   (1), an equal one a tie (1/2), a lower one a loss (0). `win_rate` is the mean,
   `tie_rate` the fraction of ties, `policy_reward` and `reference_reward` the mean scores.
   The same again at each of `eval.temperatures`.
5. Best-of-n (optional, `eval.best_of_n`). Per prompt, n completions sampled from the
   reference (the usual baseline), the model, or both (`eval.best_of_n_from`), with the
   judged samples' temperature and top_p; the one the judge scores highest is kept. Per
   n: its mean reward, its win rate over the reference's single samples, and the
   analytic bound log n - (n-1)/n on its KL to the model it samples from
   (`best_of_n`; the max n is sampled once and each smaller n keeps the best of the
   first n).
6. Forgetting (optional). Multiple-choice tasks answered by both models: the choice with
   the highest log-likelihood given the question (summed over its tokens, or per token
   with `eval.task_scoring: mean`; the first of equal scores) is the answer. Rows that
   share one set of choices (at least two rows) are a classification task: per class
   (choice text) precision, recall and F1, with macro-F1 and accuracy, for the model
   (after DPO) and the reference (before), with bootstrap intervals over the rows
   (`task_check`, `classification_metrics`).

Means come with percentile-bootstrap intervals (`stats.py`). The results go to eval.json
and a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers.utils import logging as hf_logging

from privdpo.checkpoint import load_trainable
from privdpo.config import (
    DataConfig,
    DPORunConfig,
    EvalModelConfig,
    EvalRunConfig,
    ModelConfig,
    SFTRunConfig,
    load_config,
)
from privdpo.data.batching import example_batch, pair_batch
from privdpo.data.preference import PairExample, load_preference_data, read_pairs
from privdpo.data.readers import Row, read_rows
from privdpo.data.sft import messages_field
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import BadRow, Segment, tokenize_segments
from privdpo.errors import ConfigError, DataError, UserError
from privdpo.generation import eos_token_ids, exact_sequence_kl, generate, sequence_kl
from privdpo.judges import Judge, load_judge, pairwise_outcomes
from privdpo.logprobs import sequence_logps
from privdpo.models import (
    DTYPES,
    add_lora,
    check_local_model_dir,
    load_model_and_tokenizer,
    refuse_audit_model,
)
from privdpo.report import write_report
from privdpo.stats import Estimate, bootstrap_estimate, mean_estimate, ratio_estimate
from privdpo.training import micro_batches, pick_device

EVAL_FILE = "eval.json"


# ---------------------------------------------------------------------------------------
# Metrics: pure functions of models and data, usable outside the recipe
# ---------------------------------------------------------------------------------------


@dataclass
class PreferenceScores:
    """Per-pair log-probs [N] of chosen/rejected under the policy and the reference, and
    the implicit reward margins [N] = beta * (chosen log-ratio - rejected log-ratio)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    margins: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        """1.0 where the margin is strictly positive (a tie is not correct), else 0.0."""
        return (self.margins > 0).float()


@torch.no_grad()
def evaluate_preferences(
    policy, reference, pairs: list[PairExample], beta: float, pad_id: int, batch_size: int = 8
) -> PreferenceScores:
    """Score held-out pairs under both models (chosen and rejected in one pass each)."""
    device = next(policy.parameters()).device
    ref_device = next(reference.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("c", "r", "rc", "rr")}
    for chunk in micro_batches(pairs, batch_size):
        batch = pair_batch(chunk, pad_id)
        logps, _ = sequence_logps(policy.eval(), batch.to(device))
        ref, _ = sequence_logps(reference.eval(), batch.to(ref_device))
        for key, value in zip(
            ("c", "r", "rc", "rr"), (*logps.chunk(2), *ref.chunk(2)), strict=True
        ):
            parts[key].append(value.float().cpu())
    c, r, rc, rr = (torch.cat(parts[k]) for k in ("c", "r", "rc", "rr"))
    return PreferenceScores(c, r, rc, rr, beta * ((c - rc) - (r - rr)))


def win_rate(
    policy_scores: list[float],
    reference_scores: list[float],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """`win_rate` (ties count 1/2) and `tie_rate` of the policy's completions over the
    reference's, item by item, each with a bootstrap interval."""
    outcomes = pairwise_outcomes(policy_scores, reference_scores)
    ties = [1.0 if o == 0.5 else 0.0 for o in outcomes]
    return {
        "win_rate": mean_estimate(outcomes, samples, confidence, seed),
        "tie_rate": mean_estimate(ties, samples, confidence, seed),
    }


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1)/n: the analytic bound on KL(best-of-n || the model it samples from)
    in nats per sequence (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_indices(scores: list[list[float]], n: int) -> list[int]:
    """Per prompt, the index of the highest of its first `n` scores (the first of equal
    ones): the sample best-of-n keeps."""
    out = []
    for row in scores:
        if len(row) < n:
            raise ValueError(f"best-of-{n} needs {n} scores per prompt, got {len(row)}")
        first = row[:n]
        out.append(first.index(max(first)))
    return out


@dataclass
class BestOfN:
    """Best-of-n of one model: per prompt, which of its samples was kept (index among the
    n), that completion's text and its judge score."""

    n: int
    chosen: list[int]
    completions: list[str]
    scores: list[float]


@torch.no_grad()
def best_of_n(
    model,
    tokenizer,
    prompts: list[list[int]],
    judge: Judge,
    ns: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    eos_ids: list[int] | None = None,
) -> list[BestOfN]:
    """Best-of-n sampling for each n of `ns`, in that order: per prompt (token ids), n
    completions sampled from `model`, the one `judge` scores highest kept (the first of
    equal scores). Its score is its reward.

    The samples are drawn once: max(ns) completions per prompt from one `generate` call
    over each prompt repeated max(ns) times (batches of `batch_size` sequences, one seeded
    generator), each scored once; best-of-n keeps the best of the first n of them. So the
    cost is that of the largest n alone, and the results for different n are nested (a
    prompt's best-of-n score never falls as n grows), not independent. The judge sees the
    prompt and completion decoded with special tokens skipped, as `run_eval` shows them.
    `eos_ids`: the tokens that end a completion (default: `eos_token_ids(model, tokenizer)`).
    """
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be a non-empty list of n >= 1, got {ns}")
    most = max(ns)
    sampled = generate(
        model,
        [p for p in prompts for _ in range(most)],
        pad_id=tokenizer.pad_token_id,
        eos_ids=eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in sampled]
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    flat = judge.score([t for t in prompt_texts for _ in range(most)], texts)
    scores = [[float(x) for x in flat[i * most : (i + 1) * most]] for i in range(len(prompts))]
    results = []
    for n in ns:
        chosen = best_indices(scores, n)
        results.append(
            BestOfN(
                n,
                chosen,
                [texts[i * most + c] for i, c in enumerate(chosen)],
                [scores[i][c] for i, c in enumerate(chosen)],
            )
        )
    return results


@dataclass
class ChoiceTask:
    question_ids: list[int]
    choice_ids: list[list[int]]  # each choice's tokens, after the question's
    answer: int
    where: str
    choices: tuple[str, ...] = ()  # the choices' texts (their classes, in a classification)


@torch.no_grad()
def multiple_choice_answers(
    model, tasks: list[ChoiceTask], pad_id: int, scoring: str = "sum", batch_size: int = 8
) -> list[int]:
    """Per task the index of the choice with the highest score: log p(choice | question)
    summed over its tokens (`sum`) or divided by their number (`mean`); of equal scores
    the first choice wins."""
    device = next(model.parameters()).device
    rows = [(t, c) for t, task in enumerate(tasks) for c in range(len(task.choice_ids))]
    scores: dict[tuple[int, int], float] = {}
    for chunk in micro_batches(rows, batch_size):
        seqs = []
        for t, c in chunk:
            q, choice = tasks[t].question_ids, tasks[t].choice_ids[c]
            seqs.append(_Scored(q + choice, len(q)))
        logps, num_tokens = sequence_logps(model.eval(), example_batch(seqs, pad_id).to(device))
        if scoring == "mean":
            logps = logps / num_tokens
        for key, value in zip(chunk, logps.tolist(), strict=True):
            scores[key] = value
    answers = []
    for t, task in enumerate(tasks):
        choice_scores = [scores[(t, c)] for c in range(len(task.choice_ids))]
        answers.append(choice_scores.index(max(choice_scores)))
    return answers


def multiple_choice_correct(
    model, tasks: list[ChoiceTask], pad_id: int, scoring: str = "sum", batch_size: int = 8
) -> list[float]:
    """Per task 1.0 if the answer of `multiple_choice_answers` is the right one, else 0.0."""
    answers = multiple_choice_answers(model, tasks, pad_id, scoring, batch_size)
    return [1.0 if a == task.answer else 0.0 for a, task in zip(answers, tasks, strict=True)]


def classification_groups(tasks: list[ChoiceTask]) -> list[tuple[list[str], list[int]]]:
    """The classification tasks among multiple-choice rows: rows whose choices are one set
    of distinct texts (in any order), when at least two rows share it. Per set: its
    classes (in the order of its first row) and the indices of its rows, in order of
    first appearance."""
    groups: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
    for t, task in enumerate(tasks):
        if len(set(task.choices)) != len(task.choices) or not task.choices:
            continue  # repeated choice texts name no classes
        key = tuple(sorted(task.choices))
        groups.setdefault(key, (list(task.choices), []))[1].append(t)
    return [g for g in groups.values() if len(g[1]) >= 2]


@dataclass
class ClassificationMetrics:
    """Accuracy, macro-F1 and per-class precision, recall and F1, each with its
    bootstrap interval over the items; None where undefined (a precision when the class
    is never predicted, a recall when it never occurs, an F1 when neither)."""

    accuracy: Estimate
    macro_f1: Estimate | None
    precision: list[Estimate | None]
    recall: list[Estimate | None]
    f1: list[Estimate | None]
    support: list[int]  # items of each true class
    predicted: list[int]  # items predicted as each class

    def to_dict(self, classes: list[str]) -> dict:
        def d(e: Estimate | None) -> dict | None:
            return None if e is None else e.to_dict()

        return {
            "accuracy": self.accuracy.to_dict(),
            "macro_f1": d(self.macro_f1),
            "per_class": [
                {
                    "class": name,
                    "precision": d(self.precision[c]),
                    "recall": d(self.recall[c]),
                    "f1": d(self.f1[c]),
                    "support": self.support[c],
                    "predicted": self.predicted[c],
                }
                for c, name in enumerate(classes)
            ],
        }


def classification_metrics(
    predicted: list[int],
    gold: list[int],
    num_classes: int,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ClassificationMetrics:
    """Per class c, from the items' predicted and true classes (0..num_classes-1):
    precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn) (= 2PR/(P+R)); macro-F1
    the mean F1 over the classes that occur or are predicted; accuracy the fraction
    right. Intervals: the percentile bootstrap over items (`stats.bootstrap_estimate`;
    one set of resamples for every number, resamples where a number is undefined left
    out)."""
    pred = np.asarray(predicted, dtype=np.int64)
    true = np.asarray(gold, dtype=np.int64)
    if pred.shape != true.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError("classification_metrics needs equal, non-empty lists of classes")
    if pred.min() < 0 or max(pred.max(), true.max()) >= num_classes or true.min() < 0:
        raise ValueError(f"classes must be 0..{num_classes - 1}")
    classes = np.arange(num_classes)
    cells = num_classes * num_classes
    code = pred * num_classes + true  # the item's cell of the confusion matrix
    memo: dict = {}  # every statistic sees the same resamples: count them once

    def counts(picks: np.ndarray):
        key = (picks.shape, hash(picks.tobytes()))
        if key not in memo:
            flat = code[picks] + cells * np.arange(picks.shape[0])[:, None]
            confusion = np.bincount(flat.ravel(), minlength=cells * picks.shape[0]).reshape(
                picks.shape[0], num_classes, num_classes
            )  # [R, predicted, true]
            tp = np.diagonal(confusion, axis1=1, axis2=2)
            memo[key] = (tp, confusion.sum(2) - tp, confusion.sum(1) - tp)
        return memo[key]  # tp, fp, fn: [R, C]

    def ratio(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            return a / b

    def per_class(kind: str, c: int):
        def statistic(picks):
            tp, fp, fn = (x[:, c].astype(np.float64) for x in counts(picks))
            if kind == "precision":
                return ratio(tp, tp + fp)
            if kind == "recall":
                return ratio(tp, tp + fn)
            return ratio(2 * tp, 2 * tp + fp + fn)

        return bootstrap_estimate(statistic, pred.size, samples, confidence, seed)

    def macro_f1(picks):
        tp, fp, fn = (x.astype(np.float64) for x in counts(picks))
        f1 = ratio(2 * tp, 2 * tp + fp + fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no class
            return np.nanmean(f1, axis=1)

    return ClassificationMetrics(
        accuracy=mean_estimate((pred == true).astype(np.float64), samples, confidence, seed),
        macro_f1=bootstrap_estimate(macro_f1, pred.size, samples, confidence, seed),
        precision=[per_class("precision", c) for c in classes],
        recall=[per_class("recall", c) for c in classes],
        f1=[per_class("f1", c) for c in classes],
        support=[int((true == c).sum()) for c in classes],
        predicted=[int((pred == c).sum()) for c in classes],
    )


def task_check(
    policy,
    reference,
    tasks: list[ChoiceTask],
    pad_id: int,
    scoring: str = "sum",
    batch_size: int = 8,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The forgetting check: both models answer the tasks (`multiple_choice_answers`).
    Returns {"policy_accuracy", "reference_accuracy", "tasks", "classification"}: the
    accuracies over every task, and per classification task (`classification_groups`)
    {"classes", "tasks", "policy", "reference"}, each model's `ClassificationMetrics` as
    a dict (classes by their choice text) after DPO (policy) and before (reference)."""
    answers = {
        "policy": multiple_choice_answers(policy, tasks, pad_id, scoring, batch_size),
        "reference": multiple_choice_answers(reference, tasks, pad_id, scoring, batch_size),
    }
    right = {
        k: sum(a == t.answer for a, t in zip(v, tasks, strict=True)) for k, v in answers.items()
    }
    classification = []
    for classes, rows in classification_groups(tasks):
        gold = [classes.index(tasks[t].choices[tasks[t].answer]) for t in rows]
        block: dict = {"classes": classes, "tasks": len(rows)}
        for side, given in answers.items():
            predicted = [classes.index(tasks[t].choices[given[t]]) for t in rows]
            block[side] = classification_metrics(
                predicted, gold, len(classes), samples, confidence, seed
            ).to_dict(classes)
        classification.append(block)
    return {
        "policy_accuracy": right["policy"] / len(tasks),
        "reference_accuracy": right["reference"] / len(tasks),
        "tasks": len(tasks),
        "classification": classification,
    }


class _Scored:
    """A sequence whose tokens from `start` on are scored."""

    __slots__ = ("input_ids", "labels")

    def __init__(self, input_ids: list[int], start: int):
        self.input_ids = input_ids
        self.labels = [-100] * start + input_ids[start:]


# ---------------------------------------------------------------------------------------
# Reading prompts and tasks
# ---------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the model sees it before its response: plain text with the
    tokenizer's special tokens (as in training), or a chat rendered with its template and
    the assistant's generation header."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def prompt_field(row: Row, key: str = "data.prompts") -> str | list[dict]:
    """The `prompt` of a row from `read_rows`: non-empty text, or a list of chat messages;
    otherwise a DataError naming the row's file:line and the config key `key`."""
    if row.fields is None:
        raise DataError(f"{row.where}: {row.problem}")
    value = row.fields.get("prompt")
    try:
        if isinstance(value, list):
            return messages_field(value, "prompt")
        if not isinstance(value, str) or not value.strip():
            raise BadRow("missing_field", "needs a non-empty 'prompt' (text or messages)")
    except BadRow as e:
        raise DataError(f"{row.where}: {key}: {e}") from None
    return value


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    """The `prompt` of every row of a local file (text, or a list of chat messages)."""
    return [prompt_ids(tokenizer, prompt_field(row)) for row in read_rows(path)]


def read_tasks(path: str, tokenizer) -> list[ChoiceTask]:
    """Multiple-choice rows {"question": text, "choices": [text, ...], "answer": index}.

    Each choice is tokenized as the continuation of its question, with the same boundary
    rule as training data; write the separator (e.g. a leading space) into the choices.
    """
    tasks = []
    summary = DataSummary("error")
    for row in read_rows(path):
        if row.fields is None:
            raise DataError(f"{row.where}: {row.problem}")
        f = row.fields
        question, choices, answer = f.get("question"), f.get("choices"), f.get("answer")
        if not isinstance(question, str) or not question:
            raise DataError(f"{row.where}: eval.tasks: 'question' must be non-empty text")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise DataError(
                f"{row.where}: eval.tasks: 'choices' must be a list of at least two texts"
            )
        if (
            isinstance(answer, bool)
            or not isinstance(answer, int)
            or not 0 <= answer < len(choices)
        ):
            raise DataError(
                f"{row.where}: eval.tasks: 'answer' must be the index (0 to"
                f" {len(choices) - 1}) of the right choice, got {answer!r}"
            )
        question_ids, choice_ids = None, []
        for choice in choices:
            tok = tokenize_segments(
                tokenizer,
                [Segment(question, False), Segment(choice, True)],
                templated=False,
                append_eos=False,
                boundary_mismatch="split",
                where=row.where,
                summary=summary,
            )
            start = next(i for i, label in enumerate(tok.labels) if label != -100)
            if question_ids is not None and tok.input_ids[:start] != question_ids:
                raise DataError(f"{row.where}: eval.tasks: the question tokenizes differently")
            question_ids = tok.input_ids[:start]
            choice_ids.append(tok.input_ids[start:])
        tasks.append(ChoiceTask(question_ids, choice_ids, answer, row.where, tuple(choices)))
    return tasks


# ---------------------------------------------------------------------------------------
# What the config points at: the model, its reference, the data
# ---------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """Where a model comes from: a model directory, a peft adapter (merged onto its local
    base), a preset rebuilt from its seed, or a checkpoint of a run (the run's starting
    model with the checkpoint's trainable weights)."""

    kind: str  # "dir", "adapter", "preset" or "checkpoint"
    label: str
    path: Path | None = None
    preset: str | None = None
    seed: int = 0
    dtype: str = "float32"


@dataclass
class EvalPlan:
    policy: ModelSource
    reference: ModelSource
    beta: float
    pair_files: list[str]  # empty: the run's held-out split
    run: DPORunConfig | SFTRunConfig | None
    output_dir: Path


def checkpoint_run_dir(path: Path) -> Path | None:
    """The run directory of a checkpoint directory (`RUN/checkpoints/step-N` or
    `RUN/checkpoints/best`), or None when `path` is no checkpoint."""
    if not (path / "trainable.safetensors").is_file():
        return None
    run_dir = path.parent.parent
    return (
        run_dir
        if path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file()
        else None
    )


def _directory_source(path: Path, label: str) -> ModelSource | None:
    if (path / "adapter_config.json").is_file():
        return ModelSource("adapter", label, path)
    if (path / "config.json").is_file():
        return ModelSource("dir", label, path)
    return None


def _run_config(run_dir: Path) -> DPORunConfig | SFTRunConfig:
    path = run_dir / "config.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return load_config(DPORunConfig if "dpo" in raw else SFTRunConfig, path, [])
    except UserError as e:
        raise UserError(
            f"model.path: the run's config {path} does not load with this privdpo: {e}"
        ) from None


def _run_reference(run_dir: Path, run) -> ModelSource:
    """The model a run started from: what its DPO reference was, or its initial weights."""
    if isinstance(run, DPORunConfig) and run.dpo.reference == "path":
        path = run.dpo.reference_path
        return ModelSource("dir", path, Path(path).expanduser())
    if run.model.path:
        return ModelSource("dir", run.model.path, Path(run.model.path).expanduser())
    if (run_dir / "base_model").is_dir():  # a LoRA run on a preset exports its base
        return ModelSource("dir", str(run_dir / "base_model"), run_dir / "base_model")
    # A full fine-tuning run on a preset: its initial weights are the preset's random init
    # under the run's seed, which `load_model_and_tokenizer` rebuilds exactly.
    return ModelSource(
        "preset",
        f"preset {run.model.preset} (seed {run.train.seed}: the run's initial weights)",
        preset=run.model.preset,
        seed=run.train.seed,
        dtype=run.model.dtype,
    )


def policy_source(
    path_text: str, problems: list[str]
) -> tuple[ModelSource | None, DPORunConfig | SFTRunConfig | None]:
    """The model at `model.path` (a run directory's model/, else its adapter/; or a model
    directory) and the run's config when it is a run; problems go to `problems`."""
    path = Path(path_text).expanduser()
    if not path.exists():
        check_local_model_dir(path_text)  # raises, with a hint for a Hub id
    run = None
    policy = None
    run_dir = checkpoint_run_dir(path)
    if run_dir is not None:
        return ModelSource("checkpoint", str(path), path), _run_config(run_dir)
    if (path / "config.yaml").is_file():
        run = _run_config(path)
        for sub in ("model", "adapter"):
            if (path / sub).is_dir():
                policy = _directory_source(path / sub, str(path / sub))
                break
        if policy is None:
            problems.append(
                f"model.path: the run directory {path} holds no exported model (model/ or"
                " adapter/); let the run finish, or point model.path at a model directory"
            )
    else:
        policy = _directory_source(path, str(path))
        if policy is None:
            problems.append(
                f"model.path: {path} is neither a run directory (config.yaml) nor a model"
                " directory (config.json or adapter_config.json)"
            )
    return policy, run


def resolve(cfg: EvalRunConfig) -> EvalPlan:
    """Fill the config's run-dependent defaults; every problem is reported at once."""
    problems: list[str] = []
    path = Path(cfg.model.path).expanduser()
    policy, run = policy_source(cfg.model.path, problems)

    if cfg.reference.path:
        ref_path = Path(cfg.reference.path).expanduser()
        reference = _directory_source(ref_path, cfg.reference.path)
        if reference is None:
            problems.append(
                f"reference.path: {cfg.reference.path} is not a local model directory (no"
                " config.json or adapter_config.json)"
            )
    elif run is not None:
        reference = _run_reference(checkpoint_run_dir(path) or path, run)
    else:
        reference = None
        problems.append(
            "reference.path: required when model.path is a model directory rather than a run"
            " directory; set it to the local model the evaluated one started from (e.g. the"
            " SFT model)"
        )

    is_dpo_run = isinstance(run, DPORunConfig)
    beta = cfg.eval.beta if cfg.eval.beta is not None else (run.dpo.beta if is_dpo_run else None)
    if beta is None:
        problems.append(
            "eval.beta: required when model.path is not a DPO run directory (whose dpo.beta"
            " is used); set it to the beta the model was trained with (0.1 is common)"
        )

    pairs = cfg.data.pairs
    pair_files = [pairs] if isinstance(pairs, str) else list(pairs or [])
    if not pair_files:
        if not is_dpo_run:
            problems.append(
                "data.pairs: required (only a DPO run directory has held-out pairs of its"
                " own); set it to a local preference file"
            )
        elif run.data.eval is None and run.data.eval_fraction == 0:
            problems.append(
                "data.pairs: the run held out no pairs (data.eval_fraction=0, no data.eval);"
                " set data.pairs to a held-out preference file"
            )

    if cfg.output.dir:
        output_dir = Path(cfg.output.dir)
    elif run is not None:
        output_dir = path
    else:
        output_dir = Path()
        problems.append("output.dir: required when model.path is not a run directory")
    if problems:
        raise ConfigError(problems)
    return EvalPlan(policy, reference, beta, pair_files, run, output_dir)


@contextlib.contextmanager
def _errors_name(key: str):
    """Model-loading errors name `model.path`; say `key` instead when loading another."""
    try:
        yield
    except UserError as e:
        message = str(e)
        if key != "model.path" and message.startswith("model.path:"):
            message = key + message[len("model.path") :]
        raise UserError(message) from None


def load_source(source: ModelSource, cfg: EvalModelConfig, key: str, audit_model_ok: bool = False):
    """(model, tokenizer) of a source, in eval mode, without gradients, in `cfg.dtype`.
    A model marked by `privdpo audit` is refused unless `audit_model_ok`."""
    with _errors_name(key):
        if source.kind == "preset":
            model, tokenizer = load_model_and_tokenizer(
                ModelConfig(preset=source.preset, dtype=source.dtype), source.seed
            )
        elif source.kind == "adapter":
            if not audit_model_ok:
                refuse_audit_model(source.path)
            model, tokenizer = _load_adapter(source.path, cfg, key)
        elif source.kind == "checkpoint":
            if not audit_model_ok:  # an audit run's checkpoints hold its canaries too
                refuse_audit_model(checkpoint_run_dir(source.path))
            model, tokenizer = _load_checkpoint(source.path, cfg)
        else:
            if not source.path.exists():
                raise UserError(
                    f"model.path: {source.path} ({source.label}) does not exist here; relative"
                    " paths of a run are relative to where it was started"
                )
            model, tokenizer = load_model_and_tokenizer(
                ModelConfig(
                    path=str(source.path),
                    dtype=cfg.dtype,
                    trust_remote_code=cfg.trust_remote_code,
                ),
                audit_model_ok=audit_model_ok,
            )
    model.to(DTYPES[cfg.dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _load_checkpoint(path: Path, cfg: EvalModelConfig):
    """The model of a run at one of its checkpoints: the run's starting model (as the run
    loaded it), its LoRA adapters if it trained some, the checkpoint's trainable weights;
    LoRA merged."""
    run = _run_config(checkpoint_run_dir(path))
    model, tokenizer = load_model_and_tokenizer(
        dataclasses.replace(run.model, dtype=cfg.dtype), run.train.seed
    )
    if run.model.lora.enabled:
        model = add_lora(model, run.model.lora)
    else:
        model.requires_grad_(True)  # full fine-tuning: every weight is in the checkpoint
    try:
        load_trainable(path, model)
    except KeyError as e:
        raise UserError(
            f"model.path: the checkpoint {path} does not hold the weights its run trains"
            f" (missing {e}); it was written by another run or another privdpo"
        ) from None
    return (model.merge_and_unload() if run.model.lora.enabled else model), tokenizer


def _load_adapter(path: Path, cfg: EvalModelConfig, key: str):
    """A peft adapter merged onto its base model, which must be a local directory."""
    from peft import PeftModel

    from privdpo.models import VOCABULARY_FILES, load_tokenizer

    adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base = adapter_cfg.get("base_model_name_or_path") or ""
    if not Path(base).expanduser().is_dir():
        raise UserError(
            f"model.path: the adapter {path} applies to {base!r}, which is not a local"
            " directory; copy that base model here and set base_model_name_or_path in"
            f" {path / 'adapter_config.json'}"
        )
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(path=base, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    )
    model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    if any((path / name).is_file() for name in VOCABULARY_FILES):
        tokenizer = load_tokenizer(
            ModelConfig(tokenizer_path=str(path), trust_remote_code=cfg.trust_remote_code)
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_pairs(plan: EvalPlan, cfg: EvalRunConfig, tokenizer) -> tuple[list, DataSummary]:
    """The held-out pairs: the files in data.pairs, or the split the run held out."""
    d = cfg.data
    run_data = plan.run.data if plan.run is not None else DataConfig(max_length=512)
    tokenization = dataclasses.replace(
        run_data,
        max_length=d.max_length if d.max_length is not None else run_data.max_length,
        max_prompt_length=(
            d.max_prompt_length if d.max_prompt_length is not None else run_data.max_prompt_length
        ),
    )
    if not plan.pair_files:
        # Exactly the run's split: its data settings and seed, held-out part only.
        for key in ("train", "eval"):
            file = getattr(run_data, key)
            if file is not None and not Path(file).expanduser().exists():
                raise UserError(
                    f"data.pairs: the run's held-out pairs come from its data.{key} {file},"
                    " which does not exist here (a run's relative paths are relative to"
                    " where it was started); run privdpo eval from there or set data.pairs"
                )
        # Scrubbed as the run scrubbed them, so no identifier reaches eval.json's samples.
        _, pairs, summary = load_preference_data(
            tokenization, tokenizer, plan.run.train.seed, getattr(plan.run, "scrub", None)
        )
        if not pairs:
            raise UserError(f"data.pairs: the run's held-out split of {run_data.train} is empty")
        return pairs, summary
    data_cfg = dataclasses.replace(
        tokenization, eval=None, eval_fraction=0.0, on_bad_row=d.on_bad_row
    )
    summary = DataSummary(d.on_bad_row)
    pairs = []
    for path in plan.pair_files:
        pairs += read_pairs(path, dataclasses.replace(data_cfg, train=path), tokenizer, summary)
    if not pairs:
        raise UserError(f"data.pairs: no usable pairs in {plan.pair_files}")
    summary.kept["eval"] = len(pairs)
    return pairs, summary


def distinct_prompts(pairs: list[PairExample]) -> list[list[int]]:
    """The pairs' prompts, each once, in order of first appearance."""
    seen, out = set(), []
    for p in pairs:
        key = tuple(p.prompt_ids)
        if key not in seen:
            seen.add(key)
            out.append(p.prompt_ids)
    return out


# ---------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------


def run_eval(cfg: EvalRunConfig) -> dict:
    """Evaluate, write eval.json, print the table; returns what eval.json holds."""
    # ---- setup: everything that can fail on a user mistake, before any heavy work ------
    plan = resolve(cfg)
    hf_logging.disable_progress_bar()  # weight-loading bars, noise in an eval log
    device = pick_device(cfg.eval.device)
    policy, tokenizer = load_source(plan.policy, cfg.model, "model.path")
    reference, ref_tokenizer = load_source(plan.reference, cfg.model, "reference.path")
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"reference.path: the reference ({plan.reference.label}) has another tokenizer than"
            f" the model ({plan.policy.label}); margins and KL compare log-probs of the same"
            " tokens, so both must share one tokenizer"
        )
    policy.to(device)
    reference.to(device)
    judge = load_judge(cfg.judge, DTYPES[cfg.model.dtype], device)
    pairs, summary = load_pairs(plan, cfg, tokenizer)
    print(summary.table())
    prompts = read_prompts(cfg.data.prompts, tokenizer) if cfg.data.prompts else None
    prompts = (prompts if prompts is not None else distinct_prompts(pairs))[
        : cfg.generation.num_prompts
    ]
    tasks = read_tasks(cfg.eval.tasks, tokenizer) if cfg.eval.tasks else None
    pad_id = tokenizer.pad_token_id
    e, g = cfg.eval, cfg.generation

    def estimate(values) -> Estimate:
        return mean_estimate(list(values), e.bootstrap_samples, e.confidence, e.seed)

    print(f"evaluating {plan.policy.label} against {plan.reference.label}")
    metrics: dict[str, Estimate] = {}

    # ---- held-out preferences ----------------------------------------------------------
    scores = evaluate_preferences(policy, reference, pairs, plan.beta, pad_id, e.batch_size)
    metrics["preference_accuracy"] = estimate(scores.correct.tolist())
    metrics["mean_margin"] = estimate(scores.margins.tolist())
    metrics["num_pairs"] = Estimate(float(len(pairs)))

    # ---- generation, KL, win rate ------------------------------------------------------
    samples: list[dict] = []
    sweep: list[dict] = []
    best: list[dict] = []
    if prompts:
        metrics["num_prompts"] = Estimate(float(len(prompts)))
        eos_ids = eos_token_ids(policy, tokenizer)

        def sample(model, temperature: float, top_p: float) -> list[list[int]]:
            return generate(
                model,
                prompts,
                pad_id=pad_id,
                eos_ids=eos_ids,
                max_new_tokens=g.max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                batch_size=g.batch_size,
                seed=g.seed,
            )

        generated = {
            g.temperature: (
                sample(policy, g.temperature, g.top_p),
                sample(reference, g.temperature, g.top_p),
            )
        }
        unbiased = g.temperature == 1.0 and g.top_p == 1.0
        own = generated[g.temperature][0] if unbiased else sample(policy, 1.0, 1.0)
        log_ratios = sequence_kl(policy, reference, prompts, own, pad_id, e.batch_size)
        metrics["kl_to_reference"] = estimate(log_ratios.tolist())
        exact, tokens = exact_sequence_kl(policy, reference, prompts, own, pad_id, e.batch_size)
        metrics["kl_exact"] = estimate(exact.tolist())
        metrics["kl_exact_per_token"] = ratio_estimate(
            exact.tolist(), tokens.tolist(), e.bootstrap_samples, e.confidence, e.seed
        )

        prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]

        def texts(completions: list[list[int]]) -> list[str]:
            return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]

        pol_texts, ref_texts = (texts(c) for c in generated[g.temperature])
        pol_scores = ref_scores = None
        if judge is not None:
            pol_scores, ref_scores = _judge_both(judge, prompt_texts, pol_texts, ref_texts)
            metrics.update(
                win_rate(pol_scores, ref_scores, e.bootstrap_samples, e.confidence, e.seed)
            )
            metrics["policy_reward"] = estimate(pol_scores)
            metrics["reference_reward"] = estimate(ref_scores)
            for t in e.temperatures:
                if t not in generated:
                    generated[t] = (sample(policy, t, g.top_p), sample(reference, t, g.top_p))
                pol, ref = _judge_both(judge, prompt_texts, *(texts(c) for c in generated[t]))
                sweep.append(
                    {
                        "temperature": t,
                        "win_rate": sum(pairwise_outcomes(pol, ref)) / len(pol),
                        "reward": sum(pol) / len(pol),
                        "reference_reward": sum(ref) / len(ref),
                    }
                )
            sources = ["reference", "policy"] if e.best_of_n_from == "both" else [e.best_of_n_from]
            for source in sources if e.best_of_n else []:
                results = best_of_n(
                    policy if source == "policy" else reference,
                    tokenizer,
                    prompts,
                    judge,
                    e.best_of_n,
                    max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    top_p=g.top_p,
                    batch_size=g.batch_size,
                    seed=g.seed,
                    eos_ids=eos_ids,
                )
                for b in results:
                    won = win_rate(b.scores, ref_scores, e.bootstrap_samples, e.confidence, e.seed)
                    best.append(
                        {
                            "n": b.n,
                            "model": source,
                            "reward": estimate(b.scores).to_dict(),
                            "win_rate": won["win_rate"].to_dict(),
                            "tie_rate": won["tie_rate"].to_dict(),
                            "kl_bound": best_of_n_kl_bound(b.n),
                            "scores": b.scores,
                        }
                    )
        for i in range(min(g.keep_samples, len(prompts))):
            samples.append(
                {
                    "prompt": prompt_texts[i],
                    "policy": pol_texts[i],
                    "reference": ref_texts[i],
                    "policy_score": pol_scores[i] if pol_scores else None,
                    "reference_score": ref_scores[i] if ref_scores else None,
                }
            )

    result = {
        "model": plan.policy.label,
        "reference": plan.reference.label,
        "metrics": {name: m.to_dict() for name, m in metrics.items()},
        "temperature_sweep": sweep,
        "best_of_n": best,
        "samples": samples,
    }

    # ---- forgetting --------------------------------------------------------------------
    if tasks is not None:
        result["forgetting"] = task_check(
            policy,
            reference,
            tasks,
            pad_id,
            e.task_scoring,
            e.batch_size,
            e.bootstrap_samples,
            e.confidence,
            e.seed,
        )

    # ---- output ------------------------------------------------------------------------
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    path = plan.output_dir / EVAL_FILE
    tmp = path.with_name(f".{EVAL_FILE}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(format_table(result, e.confidence, judge))
    print(f"wrote {path}")
    if (plan.output_dir / "config.yaml").is_file():  # a run directory: its report shows this
        print(f"report: {write_report(plan.output_dir)}")
    return result


def _judge_both(judge: Judge, prompts, policy_texts, reference_texts):
    return judge.score(prompts, policy_texts), judge.score(prompts, reference_texts)


def format_table(result: dict, confidence: float, judge: Judge | None = None) -> str:
    """eval.json as a short text table."""
    level = f"{round(confidence * 100, 1):g}% CI"
    lines = [f"{'metric':<24}{'value':>10}   {level}"]
    for name, m in result["metrics"].items():
        ci = f"[{m['ci_low']:.4f}, {m['ci_high']:.4f}]" if m["ci_low"] is not None else ""
        value = f"{m['value']:.0f}" if name.startswith("num_") else f"{m['value']:.4f}"
        lines.append(f"{name:<24}{value:>10}   {ci}")
    if judge is None:
        lines.append("(no judge: set judge.kind for win rate and reward)")
    if result["temperature_sweep"]:
        lines.append(f"\n{'temperature':<14}{'win_rate':>10}{'reward':>10}{'reference':>11}")
        for row in result["temperature_sweep"]:
            lines.append(
                f"{row['temperature']:<14g}{row['win_rate']:>10.4f}{row['reward']:>10.4f}"
                f"{row['reference_reward']:>11.4f}"
            )
    if result.get("best_of_n"):
        lines.append(
            f"\n{'best-of-n':<22}{'reward':>10}   {level:<20}{'win_rate':>9}{'KL bound':>10}"
        )
        for row in result["best_of_n"]:
            w = row["reward"]
            ci = f"[{w['ci_low']:.4f}, {w['ci_high']:.4f}]" if w["ci_low"] is not None else ""
            name = f"{row['model']} n={row['n']}"
            lines.append(
                f"{name:<22}{w['value']:>10.4f}   {ci:<20}{row['win_rate']['value']:>9.4f}"
                f"{row['kl_bound']:>10.4f}"
            )
        lines.append(
            "(win rate over the reference's single samples; KL bound log n - (n-1)/n, in nats"
            " per sequence, to the model sampled from)"
        )
    if "forgetting" in result:
        f = result["forgetting"]
        lines.append(
            f"\nforgetting ({f['tasks']} tasks): accuracy {f['policy_accuracy']:.4f} after,"
            f" {f['reference_accuracy']:.4f} before (reference)"
        )
        for block in f.get("classification", []):
            lines.append(
                f"classification over {', '.join(repr(c) for c in block['classes'])}"
                f" ({block['tasks']} tasks), after / before (intervals in eval.json):"
            )
            lines.append(f"  {'class':<16}{'precision':>24}{'recall':>24}{'f1':>24}{'support':>9}")
            for c, name in enumerate(block["classes"]):
                after = block["policy"]["per_class"][c]
                before = block["reference"]["per_class"][c]
                cells = "".join(
                    f"{_short(after[k]) + ' / ' + _short(before[k]):>24}"
                    for k in ("precision", "recall", "f1")
                )
                lines.append(f"  {name.strip()[:15]:<16}{cells}{after['support']:>9}")
            lines.append(
                f"  {'macro F1':<16}{'':>48}"
                f"{_short(block['policy']['macro_f1']) + ' / ' + _short(block['reference']['macro_f1']):>24}"
            )
    return "\n".join(lines)


def _short(m: dict | None) -> str:
    return "-" if m is None else f"{m['value']:.3f}"
