"""Typed config sections, loaded from YAML plus dotted `key=value` overrides.

Every section is a plain dataclass; each field's `help` metadata is its documentation and
becomes `privdpo <command> --help`. Loading checks every key and value against the
dataclass types and reports *all* problems at once (unknown keys come with the closest
valid key), so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from privdpo.errors import ConfigError, UserError
from privdpo.prep.entities import NER_ENTITIES, PATTERN_ENTITIES


def opt(default: Any, help: str) -> Any:
    """A config field with a default and its documentation."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def sub(cls: type, help: str) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters (through peft); off means full fine-tuning."""

    enabled: bool = opt(False, "train LoRA adapters instead of all weights")
    r: int = opt(8, "LoRA rank")
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "names of the linear modules that get adapters, or ['all-linear']",
    )


@dataclass
class ModelConfig:
    """The model to fine-tune: a local Hugging Face directory or a built-in preset."""

    path: str | None = opt(
        None, "local directory of a Hugging Face model (config.json, safetensors, tokenizer)"
    )
    preset: str | None = opt(
        None, "built-in random-init model for tests and demos instead of `path` (e.g. tiny)"
    )
    dtype: Literal["float32", "bfloat16"] = opt("float32", "parameter and compute dtype")
    tokenizer_path: str | None = opt(
        None, "local directory of the tokenizer files, when they are not in model.path"
    )
    trust_remote_code: bool = opt(
        False, "run Python code shipped in the model directory (off: only built-in archs)"
    )
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters")


@dataclass
class DataConfig:
    """Training data: local files, their format, tokenization and validation."""

    train: str | None = opt(
        None, "training data file (.jsonl .json .parquet .csv) or datasets.save_to_disk dir"
    )
    eval: str | None = opt(None, "held-out file; if unset, `eval_fraction` of train is held out")
    eval_fraction: float = opt(0.1, "fraction of training rows held out when `eval` is unset")
    format: Literal["auto", "prompt_completion", "messages", "text"] = opt(
        "auto", "row format; auto detects it from the columns of the first row"
    )
    max_length: int = opt(512, "maximum tokens per sequence (prompt + completion)")
    truncation: Literal["keep_start", "keep_end"] = opt(
        "keep_start",
        "for a too-long sequence keep its first (keep_start) or last (keep_end) tokens",
    )
    on_bad_row: Literal["error", "drop"] = opt(
        "error",
        "a bad row stops the run (error) or is dropped, counted and listed in data_summary.json",
    )
    boundary_mismatch: Literal["split", "error", "drop"] = opt(
        "split",
        "when tokenizing prompt+completion changes the prompt's tokens: tokenize the two"
        " separately and concatenate (split, counted), stop (error), or drop the row",
    )
    append_eos: bool = opt(
        True, "append the EOS token to plain-text completions (chat templates end turns)"
    )
    user_id_column: str = opt("user_id", "column that names the user a row came from")
    user_salt_file: str = opt(
        ".privdpo/user-salt",
        "the project's salt for hashing user ids in lineage (created on first use; keep it"
        " out of run directories)",
    )
    missing_user_id: Literal["error", "own_user"] = opt(
        "error",
        "privacy.unit=user: a row whose user id is blank or missing stops the run (error), or"
        " counts as a user of its own (own_user)",
    )
    max_prompt_length: int | None = opt(
        None, "DPO: cap on prompt tokens (the prompt's end is kept); null: only max_length"
    )
    identical_pairs: Literal["drop", "error"] = opt(
        "drop", "DPO: a pair whose chosen equals its rejected is dropped and counted, or stops"
    )


@dataclass
class TrainConfig:
    """The optimization loop shared by every recipe."""

    seed: int = opt(0, "seed for init, data order, dropout and sampling")
    epochs: int = opt(1, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = opt(None, "optimizer steps to run; overrides epochs")
    shuffle: bool = opt(
        True,
        "shuffle the training rows each epoch (seeded); false: the file's order, e.g. to"
        " reproduce another tool's run (not with privacy: DP-SGD samples at random)",
    )
    batch_size: int = opt(8, "rows per optimizer step (the logical batch)")
    micro_batch_size: int = opt(
        8,
        "examples/pairs per forward/backward pass at most; must divide batch_size (with"
        " privacy it may exceed it: the sampled batch varies around batch_size)",
    )
    micro_batch_tokens: int | None = opt(
        None,
        "also cap a forward pass at this many tokens (packed): micro-batches are filled up to"
        " it instead of a fixed count (a longer example/pair or DP unit gets a pass alone)",
    )
    packing: bool = opt(
        True,
        "one padding-free packed row per forward pass (false: right-padded rows, for model"
        " code that cannot take packed position ids)",
    )
    share_prompt: bool = opt(
        True, "DPO: run each pair's prompt once for both responses (needs packing)"
    )
    attention: Literal["auto", "varlen", "flex", "sdpa"] = opt(
        "auto",
        "attention over packed rows: varlen (FlashAttention, CUDA), flex (FlexAttention),"
        " sdpa (dense mask, CPU); auto = varlen on CUDA in half precision, else sdpa",
    )
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "several processes (torchrun): ddp replicates the model on every rank (the default,"
        " whatever the model's size); fsdp shards each decoder layer with FSDP2, bf16 mixed"
        " precision for a bf16 model (non-private runs, no early stopping): set it when the"
        " model does not fit one GPU",
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "train.parallel=fsdp: keep the sharded parameters, gradients and optimizer state in"
        " CPU memory (the optimizer step runs on the CPU): fits a bigger model, runs slower",
    )
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    compile: bool | Literal["auto"] = opt(
        "auto",
        "torch.compile each decoder layer (dynamic shapes; compiles on the first steps),"
        " the frozen DPO reference's and the head's per-tile work; a private run's layers"
        " compute their per-unit gradients in their compiled graphs; auto = on CUDA, off"
        " on the CPU",
    )
    profile: bool = opt(
        False, "profile 3 steps after 2 warm-up steps: profile.json (GPU-busy share) and a trace"
    )
    lr: float = opt(1e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "learning-rate decay after warmup"
    )
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to lr")
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (null: no clip)")
    eval_every: int | None = opt(None, "evaluate every N steps (null: only at the end)")
    eval_at_start: bool = opt(True, "also evaluate before the first step, as a baseline")
    save_every: int | None = opt(None, "checkpoint every N steps (null: only at the end)")
    keep_checkpoints: int = opt(2, "how many of the newest checkpoints to keep on disk")
    log_every: int = opt(1, "write metrics every N steps")
    device: str = opt("auto", "auto (cuda if present), cpu, cuda or cuda:N")
    early_stopping_patience: int | None = opt(
        None, "stop after this many evaluations without improvement (null: never stop early)"
    )
    early_stopping_metric: str | None = opt(
        None, "eval metric watched (null: eval/rewards/accuracies for DPO, eval/loss for SFT)"
    )
    early_stopping_min_delta: float = opt(0.0, "smallest change that counts as an improvement")


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    completion_only_loss: bool = opt(
        True, "loss only on completion/assistant tokens (false: on every token)"
    )


@dataclass
class DPOConfig:
    """Preference optimization: the loss, its parameters and the reference policy."""

    loss: Literal[
        "sigmoid", "cdpo", "robust", "ipo", "hinge", "dpo_norm", "rpo", "simpo", "orpo"
    ] = opt("sigmoid", "preference loss (sigmoid = DPO); simpo and orpo need no reference")
    beta: float = opt(0.1, "inverse temperature of the implicit reward (IPO: its tau)")
    label_smoothing: float = opt(0.0, "cdpo/robust: assumed rate of flipped labels, in [0, 0.5)")
    rpo_alpha: float = opt(1.0, "rpo: weight of the NLL term on chosen responses")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin gamma")
    orpo_lambda: float = opt(0.1, "orpo: weight lambda of the odds-ratio term")
    reference: Literal["auto", "copy", "adapter_disabled", "path"] = opt(
        "auto",
        "reference policy: a frozen copy of the initial model, the LoRA model with adapters"
        " disabled (no second copy), or a model at reference_path; auto = adapter_disabled"
        " with LoRA, else copy",
    )
    reference_path: str | None = opt(
        None, "local model directory of the reference (reference=path)"
    )
    precompute_reference: bool = opt(
        False, "compute reference log-probs once before training and cache them on disk"
    )
    reference_cache_dir: str = opt(
        "~/.cache/privdpo/reference-logps",
        "where precomputed reference log-probs are cached, keyed by model, data and tokenization",
    )
    disable_dropout: bool = opt(
        True, "turn dropout off in the policy (its log-probs are then deterministic, like TRL)"
    )


@dataclass
class PrivacyConfig:
    """Differential privacy (DP-SGD): per-unit clipping, Gaussian noise, exact accounting."""

    enabled: bool = opt(False, "train with DP-SGD")
    unit: Literal["auto", "example", "pair", "user"] = opt(
        "auto",
        "what the guarantee protects: example (SFT row), pair (DPO pair), or user (all rows"
        " of one data.user_id_column value); auto = example for SFT, pair for DPO",
    )
    user_algorithm: Literal["uls", "els"] = opt(
        "uls",
        "unit=user: uls samples users and clips each user's averaged gradient; els samples"
        " examples/pairs and accounts for each user's k of them (Charles et al. 2024)",
    )
    contribution_bound: int | None = opt(
        None,
        "unit=user: k, the most examples/pairs one user keeps (a random k of theirs, seeded);"
        " null: els uses the median per user, uls the smallest power of two keeping half of them (at most 16)",
    )
    target_epsilon: float | None = opt(
        None,
        "privacy budget: the noise is calibrated to reach it at the last step; training"
        " stops before any step that would cross it",
    )
    noise_multiplier: float | None = opt(
        None, "sigma; if set, no calibration: the epsilon it gives is reported"
    )
    delta: float | None = opt(None, "delta of (epsilon, delta)-DP (null: a power of ten below 1/N)")
    max_grad_norm: float = opt(1.0, "clipping norm C of each unit's gradient")
    accountant: Literal["pld", "rdp"] = opt("pld", "dp-accounting accountant")
    secure_noise: bool = opt(
        False, "draw noise from a cryptographically seeded generator (runs not reproducible)"
    )
    require_end_to_end: bool = opt(
        False,
        "refuse to start when the statement could not cover every user of this run end to"
        " end (an earlier stage used their data without privacy, or with another unit)",
    )
    ghost_clipping: bool = opt(
        False,
        "per-unit norms of the token embedding and output layer from Gram matrices, not"
        " per-unit copies of them (less memory at a large vocabulary; a second pass forms"
        " their clipped sum)",
    )


@dataclass
class ScrubConfig:
    """Personal identifiers in the text fields, replaced (Presidio, with Korean patterns)."""

    enabled: bool = opt(
        False, "sft/dpo: scrub the data as it is loaded (privdpo scrub always scrubs)"
    )
    replace: Literal["placeholder", "pseudonym"] = opt(
        "placeholder",
        "placeholder: every e-mail becomes <EMAIL>; pseudonym: <EMAIL_1f3a9c2b0d>, the same"
        " for one value everywhere in the dataset (a salted HMAC of it)",
    )
    salt_file: str | None = opt(
        None,
        "pseudonym: file holding the secret salt (never written anywhere); null: a random"
        " salt for this run, so its pseudonyms link to no other run's",
    )
    entities: list[str] = opt(
        [*PATTERN_ENTITIES, *NER_ENTITIES],
        "what to find: "
        + ", ".join(PATTERN_ENTITIES)
        + "; and with spacy_model "
        + ", ".join(NER_ENTITIES),
    )
    fields: list[str] | None = opt(
        None,
        "columns to scrub (strings in them, chat messages' content); null: the text columns"
        " the loaders read (prompt, chosen, rejected, completion, messages, text)",
    )
    score_threshold: float = opt(
        0.35, "least Presidio score kept (a validated check digit scores 1, a bare pattern less)"
    )
    phone_regions: list[str] = opt(
        [],
        "more regions whose national-format phone numbers are looked for (e.g. [GB, DE]),"
        " by python-phonenumbers' matcher, slower; found anyway: +CC numbers of every"
        " country, US national numbers, Korean ones (KR_PHONE)",
    )
    kr_rrn_check_digit: bool = opt(
        True,
        "a Korean resident registration number needs a valid check digit (false: any"
        " well-formed one, as numbers issued since October 2020 have none)",
    )
    spacy_model: str | None = opt(
        None,
        "local spaCy pipeline directory for names and places (PERSON, LOCATION); null:"
        " pattern-only. Nothing is ever downloaded",
    )
    language: str = opt("en", "language code of the text (and of the spaCy pipeline)")
    workers: int | None = opt(None, "processes scrubbing in parallel (null: every CPU core)")
    chunk_rows: int = opt(256, "rows handed to a worker at a time")


def check_scrub(s: ScrubConfig) -> list[str]:
    known = (*PATTERN_ENTITIES, *NER_ENTITIES)
    problems = [
        f"scrub.entities: unknown entity {e!r}; choose from {', '.join(known)}"
        for e in s.entities
        if e not in known
    ]
    if not 0 <= s.score_threshold <= 1:
        problems.append(f"scrub.score_threshold: must be in [0, 1], got {s.score_threshold}")
    if s.workers is not None and s.workers < 1:
        problems.append(f"scrub.workers: must be at least 1 or null, got {s.workers}")
    if s.chunk_rows < 1:
        problems.append(f"scrub.chunk_rows: must be at least 1, got {s.chunk_rows}")
    if s.salt_file and s.replace != "pseudonym":
        problems.append("scrub.salt_file: set, but scrub.replace is not pseudonym; set both")
    if s.fields is not None and not s.fields:
        problems.append("scrub.fields: an empty list scrubs nothing; name columns or use null")
    return problems


@dataclass
class OutputConfig:
    """Where the run directory goes and what is exported."""

    dir: str | None = opt(None, "run directory: config, metrics, checkpoints, exported model")
    overwrite: bool = opt(False, "replace an existing run directory instead of failing")
    merge_lora: bool = opt(
        False, "LoRA only: also export merged full weights to model/ beside adapter/"
    )
    progress_bar: bool = opt(True, "show a progress bar")


@dataclass
class SFTRunConfig:
    """`privdpo sft`."""

    model: ModelConfig = sub(ModelConfig, "the model")
    data: DataConfig = sub(DataConfig, "the data")
    train: TrainConfig = sub(TrainConfig, "the training loop")
    sft: SFTConfig = sub(SFTConfig, "SFT options")
    privacy: PrivacyConfig = sub(PrivacyConfig, "differential privacy")
    scrub: ScrubConfig = sub(ScrubConfig, "personal identifiers scrubbed as the data loads")
    output: OutputConfig = sub(OutputConfig, "the run directory")

    def check(self) -> list[str]:
        return check_common(self)


@dataclass
class DPORunConfig:
    """`privdpo dpo`."""

    model: ModelConfig = sub(ModelConfig, "the policy model")
    data: DataConfig = sub(DataConfig, "the preference data")
    train: TrainConfig = sub(TrainConfig, "the training loop")
    dpo: DPOConfig = sub(DPOConfig, "preference optimization")
    privacy: PrivacyConfig = sub(PrivacyConfig, "differential privacy")
    scrub: ScrubConfig = sub(ScrubConfig, "personal identifiers scrubbed as the data loads")
    output: OutputConfig = sub(OutputConfig, "the run directory")

    def check(self) -> list[str]:
        problems = check_common(self)
        d = self.dpo
        if d.reference == "path" and not d.reference_path:
            problems.append("dpo.reference_path: required when dpo.reference=path")
        if d.reference_path and d.reference != "path":
            problems.append("dpo.reference_path: set, but dpo.reference is not 'path'; set both")
        if d.reference == "adapter_disabled" and not self.model.lora.enabled:
            problems.append(
                "dpo.reference: adapter_disabled needs LoRA (model.lora.enabled=true);"
                " use copy or path for full fine-tuning"
            )
        if not 0.0 <= d.label_smoothing < 0.5:
            problems.append(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
        for key in ("rpo_alpha", "orpo_lambda", "simpo_gamma"):
            if not getattr(d, key) >= 0:
                problems.append(f"dpo.{key}: must be at least 0, got {getattr(d, key)}")
        if not (d.beta > 0 and math.isfinite(d.beta)):
            problems.append(f"dpo.beta: must be positive, got {d.beta}")
        return problems


@dataclass
class EvalModelConfig:
    """The model to evaluate: a privdpo run directory or a local model directory."""

    path: str | None = opt(
        None,
        "a run directory (its model/, else adapter/ on its base), one of its checkpoints"
        " (RUN/checkpoints/step-N: the run's starting model with that step's weights), or a"
        " local model directory (a full model, or a peft adapter whose base is local)",
    )
    dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "compute dtype of the model, the reference and a reward-model judge"
    )
    trust_remote_code: bool = opt(
        False, "run Python code shipped in the model directories (off: only built-in archs)"
    )


@dataclass
class EvalReferenceConfig:
    """The reference policy the model is compared with (margins, KL, win rate)."""

    path: str | None = opt(
        None,
        "local model directory of the reference; null with a run directory: the model the run"
        " started from (its dpo.reference_path, else model.path, else base_model/, else its"
        " preset rebuilt with the run's seed)",
    )


@dataclass
class EvalDataConfig:
    """Held-out preference pairs and the prompts to generate from."""

    pairs: str | list[str] | None = opt(
        None,
        "held-out preference file(s), read like dpo data; null with a DPO run directory: the"
        " pairs that run held out (its data.eval, or its data.eval_fraction split)",
    )
    prompts: str | None = opt(
        None, "file of rows with a 'prompt' (text or chat messages); null: the pairs' prompts"
    )
    max_length: int | None = opt(
        None, "maximum tokens per pair; null: the run's data.max_length, else 512"
    )
    max_prompt_length: int | None = opt(
        None, "cap on prompt tokens (the prompt's end is kept); null: the run's, else none"
    )
    on_bad_row: Literal["error", "drop"] = opt(
        "error", "a bad row stops the evaluation (error) or is dropped and counted (drop)"
    )


@dataclass
class EvalGenerationConfig:
    """Sampling completions from the model and the reference."""

    num_prompts: int = opt(
        32, "distinct prompts to sample from (the first N); 0: no generation, KL or win rate"
    )
    max_new_tokens: int = opt(64, "most tokens sampled per completion (stops earlier at EOS)")
    temperature: float = opt(
        1.0, "sampling temperature of the judged samples (0: greedy); KL always samples at 1"
    )
    top_p: float = opt(1.0, "nucleus sampling: keep the most likely tokens holding this mass")
    batch_size: int = opt(8, "prompts per generation batch (left padded)")
    seed: int = opt(0, "sampling seed: the same seed and batch size give the same samples")
    keep_samples: int = opt(16, "generations written to eval.json with their judge scores")


@dataclass
class JudgeConfig:
    """A local judge that scores completions (higher is better) for win rate and reward."""

    kind: Literal["none", "lexicon", "reward_model", "callable"] = opt(
        "none",
        "none (no win rate), lexicon (VADER sentiment of the completion), reward_model (a"
        " local sequence classifier), or callable (your Python function)",
    )
    path: str | None = opt(
        None, "reward_model: local directory of an AutoModelForSequenceClassification"
    )
    callable: str | None = opt(
        None,
        "callable: 'package.module:function' taking (prompts, completions) and returning one"
        " float per completion",
    )
    batch_size: int = opt(8, "reward_model: completions scored per forward pass")
    max_length: int = opt(1024, "reward_model: most tokens of prompt + completion (keeps the end)")


@dataclass
class EvalConfig:
    """What is measured and how its uncertainty is reported."""

    beta: float | None = opt(
        None, "beta of the implicit reward beta*log(pi/pi_ref); null: the run's dpo.beta"
    )
    batch_size: int = opt(8, "pairs, sampled sequences or task choices per forward pass")
    temperatures: list[float] = opt(
        [], "temperature sweep of win rate and judge reward (needs a judge); []: no sweep"
    )
    bootstrap_samples: int = opt(
        1000, "percentile-bootstrap resamples of each interval (0: no intervals)"
    )
    confidence: float = opt(0.95, "confidence level of the bootstrap intervals")
    seed: int = opt(0, "seed of the bootstrap resampling")
    tasks: str | None = opt(
        None,
        "forgetting check: multiple-choice JSONL, rows {question, choices: [...], answer:"
        " index}, answered by both models; rows sharing one set of choices (at least two)"
        " are a classification task, with per-class precision, recall and F1; null: none",
    )
    task_scoring: Literal["sum", "mean"] = opt(
        "sum", "a choice's score: the sum of its tokens' log-probs, or their mean per token"
    )
    best_of_n: list[int] = opt(
        [],
        "best-of-n baselines (needs a judge), e.g. [2, 4, 8, 16]: per prompt n completions"
        " sampled as the judged ones (generation.temperature, top_p), the one the judge"
        " scores highest kept; its reward, its win rate over the reference's samples and the"
        " KL bound log n - (n-1)/n to the model it samples from; []: none",
    )
    best_of_n_from: Literal["reference", "policy", "both"] = opt(
        "reference",
        "the model best-of-n samples from: reference (the usual baseline, e.g. best-of-n of"
        " the SFT model), policy (the evaluated model), or both",
    )
    device: str = opt("auto", "auto (cuda if present), cpu, cuda or cuda:N")


@dataclass
class EvalOutputConfig:
    """Where eval.json goes."""

    dir: str | None = opt(
        None, "directory of eval.json; null with a run directory: the run directory"
    )


@dataclass
class AuditConfig:
    """`privdpo audit`: canaries in the configured training run, and the one-run bound."""

    canaries: int = opt(
        1000, "m: canaries (users at user level), each in the data with probability 1/2"
    )
    mode: Literal["black_box", "white_box"] = opt(
        "black_box",
        "black_box: canary examples/pairs scored from the trained model; white_box: gradient"
        " canaries inside DP-SGD scored from its privatized updates (private runs only)",
    )
    seed: int = opt(0, "seed of the canaries, their inclusion and the held-out split")
    confidence: float = opt(0.95, "confidence of the empirical lower bound")
    secret_tokens: int = opt(8, "black box: rare tokens in each canary's secret response")
    items_per_user: int = opt(2, "black box at user level: canary examples/pairs per canary user")


@dataclass
class AuditSection:
    """The `audit` section alone (the rest of an audit config is the run's)."""

    audit: AuditConfig = sub(AuditConfig, "the audit")

    def check(self) -> list[str]:
        a = self.audit
        problems = []
        if a.canaries < 10:
            problems.append(f"audit.canaries: at least 10 for a meaningful bound, got {a.canaries}")
        if not 0.5 < a.confidence < 1:
            problems.append(f"audit.confidence: must be in (0.5, 1), got {a.confidence}")
        for key in ("secret_tokens", "items_per_user"):
            if getattr(a, key) < 1:
                problems.append(f"audit.{key}: must be at least 1, got {getattr(a, key)}")
        return problems


@dataclass
class EvalRunConfig:
    """`privdpo eval`."""

    model: EvalModelConfig = sub(EvalModelConfig, "the model to evaluate")
    reference: EvalReferenceConfig = sub(EvalReferenceConfig, "the reference policy")
    data: EvalDataConfig = sub(EvalDataConfig, "held-out pairs and prompts")
    generation: EvalGenerationConfig = sub(EvalGenerationConfig, "sampling")
    judge: JudgeConfig = sub(JudgeConfig, "the judge of win rate and reward")
    eval: EvalConfig = sub(EvalConfig, "metrics and intervals")
    output: EvalOutputConfig = sub(EvalOutputConfig, "where eval.json goes")

    def check(self) -> list[str]:
        problems = []
        g, j, e = self.generation, self.judge, self.eval
        if not self.model.path:
            problems.append("model.path: required; set it to a run directory or a model directory")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(g, key) < 1:
                problems.append(f"generation.{key}: must be at least 1, got {getattr(g, key)}")
        for key in ("num_prompts", "keep_samples"):
            if getattr(g, key) < 0:
                problems.append(f"generation.{key}: must be at least 0, got {getattr(g, key)}")
        if not (g.temperature >= 0 and math.isfinite(g.temperature)):
            problems.append(f"generation.temperature: must be at least 0, got {g.temperature}")
        if not 0 < g.top_p <= 1:
            problems.append(f"generation.top_p: must be in (0, 1], got {g.top_p}")
        problems.extend(check_judge(j))
        if e.beta is not None and not (e.beta > 0 and math.isfinite(e.beta)):
            problems.append(f"eval.beta: must be positive, got {e.beta}")
        if e.batch_size < 1:
            problems.append(f"eval.batch_size: must be at least 1, got {e.batch_size}")
        if any(not (t >= 0 and math.isfinite(t)) for t in e.temperatures):
            problems.append(f"eval.temperatures: each must be at least 0, got {e.temperatures}")
        if e.temperatures and j.kind == "none":
            problems.append(
                "judge.kind: eval.temperatures asks for a sweep of win rate, which needs a"
                " judge; set judge.kind, or eval.temperatures=[]"
            )
        if e.temperatures and g.num_prompts == 0:
            problems.append("eval.temperatures: a sweep needs generation.num_prompts > 0")
        if e.best_of_n:
            if any(n < 1 for n in e.best_of_n) or len(set(e.best_of_n)) < len(e.best_of_n):
                problems.append(
                    f"eval.best_of_n: each n must be at least 1 and appear once, got {e.best_of_n}"
                )
            if j.kind == "none":
                problems.append(
                    "judge.kind: eval.best_of_n keeps the sample a judge prefers; set"
                    " judge.kind, or eval.best_of_n=[]"
                )
            if g.num_prompts == 0:
                problems.append("eval.best_of_n: needs generation.num_prompts > 0")
            if g.temperature == 0:
                problems.append(
                    "generation.temperature: eval.best_of_n needs sampling (at 0, greedy, all"
                    " n samples of a prompt are the same); set it above 0, or"
                    " eval.best_of_n=[]"
                )
        if e.bootstrap_samples < 0:
            problems.append(
                f"eval.bootstrap_samples: must be at least 0, got {e.bootstrap_samples}"
            )
        if not 0 < e.confidence < 1:
            problems.append(f"eval.confidence: must be in (0, 1), got {e.confidence}")
        d = self.data
        if d.max_length is not None and d.max_length < 2:
            problems.append(f"data.max_length: must be at least 2, got {d.max_length}")
        if d.max_prompt_length is not None and d.max_prompt_length < 1:
            problems.append(
                f"data.max_prompt_length: must be at least 1, got {d.max_prompt_length}"
            )
        if not (e.device in ("auto", "cpu", "cuda") or e.device.startswith("cuda:")):
            problems.append(f"eval.device: must be auto, cpu, cuda or cuda:N, got {e.device!r}")
        return problems


def check_judge(j: JudgeConfig) -> list[str]:
    """The judge section's cross-field checks, shared by eval and pairs."""
    problems = []
    if j.kind == "reward_model" and not j.path:
        problems.append("judge.path: required with judge.kind=reward_model")
    if j.path and j.kind != "reward_model":
        problems.append("judge.path: set, but judge.kind is not reward_model; set both")
    if j.kind == "callable" and (not j.callable or ":" not in j.callable):
        problems.append(
            f"judge.callable: judge.kind=callable needs 'package.module:function', got"
            f" {j.callable!r}"
        )
    if j.callable and j.kind != "callable":
        problems.append("judge.callable: set, but judge.kind is not callable; set both")
    for key in ("batch_size", "max_length"):
        if getattr(j, key) < 1:
            problems.append(f"judge.{key}: must be at least 1, got {getattr(j, key)}")
    return problems


@dataclass
class PairsPromptsConfig:
    """The prompts to sample from: a local file of rows with a `prompt`."""

    path: str | None = opt(
        None,
        "local file (.jsonl .json .parquet .csv) or save_to_disk dir of rows with a 'prompt'"
        " (text or chat messages)",
    )
    user_id_column: str = opt(
        "user_id", "column naming the user a prompt came from, carried over to its pair"
    )


@dataclass
class PairsGenerationConfig:
    """Sampling several completions per prompt from the model."""

    num_samples: int = opt(4, "completions sampled per prompt (at least 2)")
    max_new_tokens: int = opt(64, "most tokens sampled per completion (stops earlier at EOS)")
    temperature: float = opt(1.0, "sampling temperature (positive: greedy samples are all equal)")
    top_p: float = opt(1.0, "nucleus sampling: keep the most likely tokens holding this mass")
    batch_size: int = opt(8, "sequences per generation batch (left padded)")
    seed: int = opt(0, "sampling seed: the same seed and batch size give the same samples")
    device: str = opt("auto", "auto (cuda if present), cpu, cuda or cuda:N")


@dataclass
class PairsSelectionConfig:
    """Which sampled completions become a pair."""

    min_score_gap: float = opt(
        0.0,
        "a prompt gives the pair (best, worst) only if best - worst >= this, in the judge's"
        " units; equal scores are never a pair",
    )
    pairs_per_prompt: Literal["best_worst", "all"] = opt(
        "best_worst",
        "best_worst: one pair per prompt; all: every two samples whose scores differ by at"
        " least min_score_gap (up to n(n-1)/2 pairs from n samples)",
    )


@dataclass
class PairsOutputConfig:
    """Where the pairs go."""

    path: str | None = opt(None, "the JSONL file of pairs to write (valid data for privdpo dpo)")
    overwrite: bool = opt(False, "replace an existing file instead of failing")


@dataclass
class PairsRunConfig:
    """`privdpo pairs`."""

    model: EvalModelConfig = sub(EvalModelConfig, "the model to sample from")
    prompts: PairsPromptsConfig = sub(PairsPromptsConfig, "the prompts")
    generation: PairsGenerationConfig = sub(PairsGenerationConfig, "sampling")
    judge: JudgeConfig = sub(JudgeConfig, "the judge that scores the samples")
    selection: PairsSelectionConfig = sub(PairsSelectionConfig, "which samples make a pair")
    output: PairsOutputConfig = sub(PairsOutputConfig, "the pairs file")

    def check(self) -> list[str]:
        problems = []
        g, j = self.generation, self.judge
        if not self.model.path:
            problems.append("model.path: required; set it to a run directory or a model directory")
        if not self.prompts.path:
            problems.append("prompts.path: required; set it to a local file of prompts")
        if not self.prompts.user_id_column:
            problems.append("prompts.user_id_column: must name a column, got ''")
        if g.num_samples < 2:
            problems.append(
                f"generation.num_samples: must be at least 2 (a pair needs two), got"
                f" {g.num_samples}"
            )
        for key in ("max_new_tokens", "batch_size"):
            if getattr(g, key) < 1:
                problems.append(f"generation.{key}: must be at least 1, got {getattr(g, key)}")
        if not (g.temperature > 0 and math.isfinite(g.temperature)):
            problems.append(
                f"generation.temperature: must be positive (at 0, greedy, every sample of a"
                f" prompt is the same), got {g.temperature}"
            )
        if not 0 < g.top_p <= 1:
            problems.append(f"generation.top_p: must be in (0, 1], got {g.top_p}")
        if not (g.device in ("auto", "cpu", "cuda") or g.device.startswith("cuda:")):
            problems.append(
                f"generation.device: must be auto, cpu, cuda or cuda:N, got {g.device!r}"
            )
        if j.kind == "none":
            problems.append(
                "judge.kind: required; pairs are ranked by a judge: lexicon, reward_model (+"
                " judge.path) or callable (+ judge.callable)"
            )
        problems.extend(check_judge(j))
        gap = self.selection.min_score_gap
        if not (gap >= 0 and math.isfinite(gap)):
            problems.append(f"selection.min_score_gap: must be at least 0, got {gap}")
        if not self.output.path:
            problems.append("output.path: required; set it to the JSONL file to write")
        return problems


@dataclass
class DemoConfig:
    """The offline demo: the DPO paper's controlled sentiment experiment at small scale."""

    reviews: int = opt(7000, "reviews generated for the corpus (several thousand)")
    seed: int = opt(0, "seed of the corpus, the prompts, sampling and training")
    preset: Literal["tiny", "small"] = opt("tiny", "model preset trained from random init")
    sft_epochs: int = opt(3, "SFT passes over the reviews")
    pair_prompts: int = opt(1500, "review prefixes turned into on-policy preference pairs")
    prefixes_per_reviewer: int = opt(
        1,
        "most prefixes taken from one private reviewer's reviews (fewer each, more reviewers:"
        " user-level DP's noise on the mean gradient falls as 1 / reviewers)",
    )
    eval_prompts: int = opt(200, "held-out review prefixes the models are compared on")
    samples_per_prompt: int = opt(4, "completions sampled per prompt for the pairs")
    pairs_per_prompt: Literal["best_worst", "all"] = opt(
        "all", "pairs from each prompt's samples: the best and worst only, or every two"
    )
    min_score_gap: float = opt(0.2, "least judge-score gap between chosen and rejected")
    max_new_tokens: int = opt(40, "tokens sampled per completion")
    finetune: Literal["full", "lora"] = opt(
        "full", "DPO runs: full fine-tuning (reference: a frozen copy) or LoRA (r 8)"
    )
    beta: float = opt(1.0, "DPO beta of the main DPO run and of the DP-DPO runs")
    lr: float = opt(5e-4, "learning rate of the DPO runs")
    dpo_epochs: int = opt(4, "DPO passes over the pairs")
    checkpoints: int = opt(
        4, "points of the main DPO run on the frontier: its checkpoints along training"
    )
    frontier_betas: list[float] = opt(
        [0.5, 2.0], "more betas of non-private DPO for the reward-vs-KL frontier"
    )
    target_epsilon: float = opt(8.0, "user-level epsilon of the DP-DPO run in the headline")
    frontier_epsilons: list[float] = opt(
        [1.0, 4.0], "more DP-DPO runs, for the privacy-utility curve"
    )
    dp_finetune: Literal["full", "lora"] = opt(
        "full", "DP-DPO runs: full fine-tuning or LoRA (dp_lora_r on dp_lora_targets)"
    )
    dp_lora_r: int = opt(1, "DP-DPO with LoRA: its rank (few parameters: less noise in all)")
    dp_lora_targets: list[str] = opt(
        ["layers.1.mlp.down_proj", "layers.1.self_attn.o_proj"],
        "DP-DPO with LoRA: the modules given adapters (peft target_modules, name suffixes)",
    )
    dp_contribution_bound: int = opt(2, "DP-DPO: most pairs per user (ULS's k)")
    dp_lr: float = opt(1e-2, "DP-DPO: learning rate")
    dp_batch_size: int = opt(
        4096, "DP-DPO: expected pairs per step (at least all kept pairs: every user each step)"
    )
    dp_epochs: int = opt(3, "DP-DPO: passes over the pairs (fixes the number of steps)")
    best_of_n: list[int] = opt(
        [2, 4, 8, 16], "best-of-n of the SFT model, the baseline DPO is compared with"
    )
    user_salt_file: str = opt(
        ".privdpo/user-salt", "the salt for hashing reviewer ids in the runs' lineage"
    )
    device: str = opt("auto", "auto (cuda if present), cpu, cuda or cuda:N")


@dataclass
class DemoOutputConfig:
    """Where the demo writes."""

    dir: str = opt("runs/demo", "the demo directory: data, one run directory per model, report")
    progress_bar: bool = opt(False, "show progress bars of the training runs")


@dataclass
class DemoRunConfig:
    """`privdpo demo`."""

    demo: DemoConfig = sub(DemoConfig, "the experiment")
    output: DemoOutputConfig = sub(DemoOutputConfig, "the demo directory")

    def check(self) -> list[str]:
        d = self.demo
        problems = [
            f"demo.{key}: must be at least {low}, got {getattr(d, key)}"
            for key, low in (
                ("reviews", 100),
                ("sft_epochs", 1),
                ("pair_prompts", 10),
                ("prefixes_per_reviewer", 1),
                ("eval_prompts", 10),
                ("samples_per_prompt", 2),
                ("max_new_tokens", 1),
                ("dpo_epochs", 1),
                ("checkpoints", 1),
                ("dp_lora_r", 1),
                ("dp_contribution_bound", 1),
                ("dp_batch_size", 1),
                ("dp_epochs", 1),
            )
            if getattr(d, key) < low
        ]
        if d.pair_prompts + d.eval_prompts > d.reviews // 2:
            problems.append(
                "demo.pair_prompts + demo.eval_prompts: at most half of demo.reviews (the"
                " other half trains SFT); lower them or raise demo.reviews"
            )
        for e in [d.target_epsilon, *d.frontier_epsilons]:
            if not e > 0:
                problems.append(f"demo.target_epsilon/frontier_epsilons: must be positive, got {e}")
        for key in ("lr", "dp_lr"):
            if not getattr(d, key) > 0:
                problems.append(f"demo.{key}: must be positive, got {getattr(d, key)}")
        if not d.best_of_n or 4 not in d.best_of_n or min(d.best_of_n) < 2:
            problems.append(
                f"demo.best_of_n: n of at least 2, 4 among them (the demo's verdict compares"
                f" DPO with best-of-4), got {d.best_of_n}"
            )
        for b in [d.beta, *d.frontier_betas]:
            if not b > 0:
                problems.append(f"demo.beta/frontier_betas: must be positive, got {b}")
        return problems


@dataclass
class ScrubOutputConfig:
    """Where `privdpo scrub` writes."""

    overwrite: bool = opt(False, "replace an existing OUTPUT file instead of failing")
    progress_bar: bool = opt(True, "show a progress bar")


@dataclass
class ScrubRunConfig:
    """`privdpo scrub INPUT OUTPUT`."""

    scrub: ScrubConfig = sub(ScrubConfig, "what is found and how it is replaced")
    output: ScrubOutputConfig = sub(ScrubOutputConfig, "the output file")

    def check(self) -> list[str]:
        return check_scrub(self.scrub)


@dataclass
class InspectConfig:
    """What `privdpo inspect` flags as a problem."""

    near_duplicate_threshold: float = opt(
        0.8, "prompts this similar (Jaccard of token 3-grams) are near-duplicates"
    )
    length_bias_threshold: float = opt(
        0.6,
        "flag length bias when chosen is longer (or shorter) in more than this share of"
        " pairs whose lengths differ (with at least 20 such pairs)",
    )
    output: str = opt("inspect.json", "where `privdpo inspect` writes its JSON report")


@dataclass
class InspectRunConfig:
    """`privdpo inspect DATA`: the data, the tokenizer that counts tokens, max_length."""

    model: ModelConfig = sub(
        ModelConfig, "the tokenizer: model.path (or tokenizer_path), or a preset (default tiny)"
    )
    data: DataConfig = sub(DataConfig, "the data (data.train is DATA; data.eval is optional)")
    inspect: InspectConfig = sub(InspectConfig, "thresholds and the output file")

    def check(self) -> list[str]:
        problems = []
        if self.model.path and self.model.preset:
            problems.append("model: set model.path or model.preset, not both")
        if not self.data.train:
            problems.append("data.train: required; pass the data file as DATA")
        if not 0 < self.inspect.near_duplicate_threshold <= 1:
            problems.append(
                "inspect.near_duplicate_threshold: must be in (0, 1], got"
                f" {self.inspect.near_duplicate_threshold}"
            )
        if not 0.5 < self.inspect.length_bias_threshold < 1:
            problems.append(
                "inspect.length_bias_threshold: must be in (0.5, 1), got"
                f" {self.inspect.length_bias_threshold}"
            )
        if self.data.max_length < 2:
            problems.append(f"data.max_length: must be at least 2, got {self.data.max_length}")
        return problems


def check_common(cfg: Any) -> list[str]:
    """Cross-field checks that the types alone cannot express."""
    problems = []
    m, d, t = cfg.model, cfg.data, cfg.train
    if (not m.path) == (not m.preset):
        problems.append(
            "model: set exactly one of model.path (a local Hugging Face directory)"
            " or model.preset (e.g. tiny)"
        )
    if not d.train:
        problems.append("data.train: required; set it to a local data file")
    if not cfg.output.dir:
        problems.append("output.dir: required; set it to the run directory to create")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    if cfg.output.dir and d.user_salt_file:
        salt = Path(d.user_salt_file).expanduser().resolve()
        if salt.is_relative_to(Path(cfg.output.dir).expanduser().resolve()):
            problems.append(
                f"data.user_salt_file: {d.user_salt_file} is inside output.dir"
                f" {cfg.output.dir}; the salt must stay out of what a run writes (anyone"
                " holding it can test user ids against the hashes): set it to a path outside"
                " output.dir"
            )
    problems.extend(check_privacy(cfg))
    problems.extend(check_scrub(cfg.scrub))
    if not t.shuffle and cfg.privacy.enabled:
        problems.append(
            "train.shuffle: false fixes the order, but DP-SGD samples its units at random"
            " (Poisson) and its guarantee depends on that; set train.shuffle=true"
        )
    if m.tokenizer_path and m.preset:
        problems.append("model.tokenizer_path: a preset builds its own tokenizer; unset one")
    if t.early_stopping_patience is not None and not d.eval and d.eval_fraction == 0:
        problems.append(
            "train.early_stopping_patience: needs a held-out split (data.eval or"
            " data.eval_fraction > 0)"
        )
    if d.max_prompt_length is not None and not 1 <= d.max_prompt_length < d.max_length:
        problems.append(
            f"data.max_prompt_length: must be between 1 and data.max_length - 1, got"
            f" {d.max_prompt_length}"
        )
    if d.max_length < 2:
        problems.append(f"data.max_length: must be at least 2, got {d.max_length}")
    for key in ("batch_size", "micro_batch_size", "epochs", "keep_checkpoints", "log_every"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    for key in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
        value = getattr(t, key)
        if value is not None and value < 1:
            problems.append(f"train.{key}: must be at least 1 or null, got {value}")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < 2:
        problems.append(
            f"train.micro_batch_tokens: must be at least 2 or null, got {t.micro_batch_tokens}"
        )
    if t.parallel == "fsdp" and cfg.privacy.enabled:
        problems.append(
            "train.parallel: fsdp shards parameters, which per-unit clipping needs whole; use"
            " train.parallel=ddp for a private run"
        )
    if t.fsdp_cpu_offload and t.parallel != "fsdp":
        problems.append(
            "train.fsdp_cpu_offload: offloads FSDP2 shards, but train.parallel is"
            f" {t.parallel}; set train.parallel=fsdp or train.fsdp_cpu_offload=false"
        )
    if t.parallel == "fsdp" and t.early_stopping_patience is not None:
        problems.append(
            "train.parallel: fsdp does not keep a best checkpoint for early stopping; use"
            " train.parallel=ddp or set train.early_stopping_patience=null"
        )
    if t.share_prompt and not t.packing and hasattr(cfg, "dpo"):
        problems.append(
            "train.share_prompt: needs train.packing=true (a padded row holds one sequence);"
            " set train.share_prompt=false"
        )
    # With privacy the logical batch is a Poisson sample that varies around batch_size, so
    # a micro-batch cap above batch_size is allowed (most steps then run in one pass).
    if t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size and not cfg.privacy.enabled:
        problems.append(
            f"train.micro_batch_size: {t.micro_batch_size} does not divide train.batch_size"
            f" {t.batch_size}; pick a divisor"
        )
    if not (t.lr > 0 and math.isfinite(t.lr)):
        problems.append(f"train.lr: must be positive, got {t.lr}")
    if len(t.adam_betas) != 2:
        problems.append(f"train.adam_betas: needs two numbers, got {t.adam_betas}")
    if m.lora.enabled and m.lora.r < 1:
        problems.append(f"model.lora.r: must be at least 1, got {m.lora.r}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        problems.append(f"train.device: must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    return problems


def check_privacy(cfg: Any) -> list[str]:
    pv = cfg.privacy
    if not pv.enabled:
        return []
    problems = []
    if pv.target_epsilon is None and pv.noise_multiplier is None:
        problems.append(
            "privacy: set privacy.target_epsilon (the noise is calibrated to it) or"
            " privacy.noise_multiplier (its epsilon is reported), or both (the target is then"
            " a budget the run stops before crossing)"
        )
    if pv.target_epsilon is not None and not pv.target_epsilon > 0:
        problems.append(f"privacy.target_epsilon: must be positive, got {pv.target_epsilon}")
    if pv.noise_multiplier is not None and not pv.noise_multiplier >= 0:
        problems.append(f"privacy.noise_multiplier: must be at least 0, got {pv.noise_multiplier}")
    if pv.delta is not None and not 0 < pv.delta < 1:
        problems.append(f"privacy.delta: must be in (0, 1), got {pv.delta}")
    if not (pv.max_grad_norm > 0 and math.isfinite(pv.max_grad_norm)):
        problems.append(f"privacy.max_grad_norm: must be positive, got {pv.max_grad_norm}")
    expected = "pair" if hasattr(cfg, "dpo") else "example"
    if pv.unit not in ("auto", expected, "user"):
        problems.append(f"privacy.unit: {pv.unit} does not fit this recipe; use {expected} or user")
    if pv.contribution_bound is not None and pv.contribution_bound < 1:
        problems.append(
            f"privacy.contribution_bound: must be at least 1, got {pv.contribution_bound}"
        )
    if pv.unit == "user" and pv.user_algorithm == "els" and pv.accountant != "pld":
        problems.append(
            "privacy.accountant: user_algorithm=els is accounted with the mixture-of-Gaussians"
            " PLD; set privacy.accountant=pld"
        )
    return problems


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    """The mapping of sections in a YAML config file; a UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass the path of a YAML config")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of sections")
    return loaded


def load_config(cls: type, path: str | Path | None, overrides: list[str]) -> Any:
    """Build `cls` from a YAML file and `key=value` overrides; raise ConfigError listing
    every problem (unknown keys with suggestions, wrong types, failed checks)."""
    return build_config(cls, read_config_file(path), overrides)


def read_config_file(path: str | Path | None) -> dict:
    """The raw sections of a YAML config file ({} for None)."""
    return read_yaml(path) if path is not None else {}


def build_config(cls: type, raw: dict, overrides: list[str]) -> Any:
    """`load_config` on raw sections already read (not modified)."""
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            problems.append(f"override {item!r}: write overrides as section.key=value")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.split("."), value, problems, item)

    cfg = _build(cls, raw, "", problems)
    # Cross-field checks too, except on keys already reported (their value is a default).
    reported = [p.split(":")[0] for p in problems]

    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    problems.extend(
        p for p in cfg.check() if not any(related(p.split(":")[0], r) for r in reported)
    )
    if problems:
        raise ConfigError(problems)
    return cfg


def _set_dotted(raw: dict, keys: list[str], value: Any, problems: list[str], item: str) -> None:
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:  # absent, or an empty section in the YAML
            node[k] = {}
        child = node[k]
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {k} is a value, not a section")
            return
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            problems.append(_unknown_key(name, key, list(fields), prefix))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{name}.", problems)
            continue
        ok, coerced = _coerce(value, hint)
        if ok:
            kwargs[key] = coerced
        else:
            problems.append(f"{name}: expected {_describe(hint)}, got {value!r}")
    return cls(**kwargs)


def _unknown_key(name: str, key, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"{name}: unknown key{hint}"


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, coerced = _coerce(value, arm)
            if ok:
                return True, coerced
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int | float):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if hint is Any:
        return True, value
    raise TypeError(f"config type {hint} not supported")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list ({_describe(typing.get_args(hint)[0])} each)"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }.get(hint, str(hint))


# ---------------------------------------------------------------------------------------
# Saving and documenting
# ---------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe_config(cls: type, prefix: str = "") -> str:
    """The `--help` text: every section and key with its type, default and doc."""
    lines = []
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(f"\n{prefix}{f.name}:  {hint.__doc__.strip().splitlines()[0]}")
            lines.append(describe_config(hint, f"{prefix}{f.name}."))
            continue
        default = getattr(defaults, f.name)
        lines.append(
            f"  {prefix}{f.name} = {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
            f"  ({_describe(hint)})\n      {f.metadata.get('help', '')}"
        )
    return "\n".join(lines)
