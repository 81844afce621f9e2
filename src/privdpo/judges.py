"""Local judges: score completions of prompts, higher is better. Nothing leaves the machine.

A judge is anything with `score(prompts, completions) -> list[float]`, one score per
(prompt, completion) pair, comparable across calls (so a policy's and a reference's
completions of the same prompt can be compared). Built in, chosen by `judge.kind`:

- `lexicon`: VADER's compound sentiment of the completion (Hutto & Gilbert 2014), in
  [-1, 1]; positive is better. Rule-based and offline (the `vaderSentiment` package reads
  its lexicon from its own files). The prompt is ignored.
- `reward_model`: a local `AutoModelForSequenceClassification` directory (safetensors, no
  remote code); the score is its label-0 logit at the last non-pad token, as the model's
  own head pools it. The text is the prompt and completion rendered with the tokenizer's
  chat template (user turn, assistant turn) when it has one, else the two concatenated.
- `callable`: your function, named as `package.module:function`, called as
  `function(prompts, completions)` and returning one float per completion.

`load_judge(cfg)` builds one from a `JudgeConfig`; `pairwise_outcomes` turns two lists of
scores into wins, ties and losses. The evaluation and the pair builder share both.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from privdpo.config import JudgeConfig
from privdpo.errors import UserError


@runtime_checkable
class Judge(Protocol):
    """Scores completions: `score(prompts, completions)[i]` is the score of completion i
    of prompt i; higher is better."""

    name: str

    def score(self, prompts: list[str], completions: list[str]) -> list[float]: ...


class LexiconJudge:
    """VADER compound sentiment of each completion (the prompt is ignored)."""

    name = "lexicon"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_lengths(prompts, completions)
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]


class RewardModelJudge:
    """The label-0 logit of a local sequence-classification model on prompt + completion."""

    name = "reward_model"

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        max_length: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = _reward_model_dir(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                directory,
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"judge.path: could not load a sequence-classification model from {directory}: {e}"
            ) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The head pools at the last token that is not padding; it must know the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the completion, cut the prompt's start
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, prompt: str, completion: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                tokenize=False,
            )
        return prompt + completion

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_lengths(prompts, completions)
        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                # Chat-rendered text carries its special tokens already.
                add_special_tokens=not self.tokenizer.chat_template,
            ).to(self.device)
            logits = self.model(**enc).logits  # [B, num_labels], pooled at the last token
            scores += logits[:, 0].float().tolist()
        return scores


class CallableJudge:
    """A user function `f(prompts, completions) -> list of floats`, imported by path."""

    name = "callable"

    def __init__(self, import_path: str):
        self.import_path = import_path
        self.function = import_callable(import_path, "judge.callable")

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_lengths(prompts, completions)
        out = self.function(list(prompts), list(completions))
        try:
            scores = [float(s) for s in out]
        except (TypeError, ValueError):
            raise UserError(
                f"judge.callable: {self.import_path} must return a list of numbers, got"
                f" {type(out).__name__}"
            ) from None
        if len(scores) != len(completions):
            raise UserError(
                f"judge.callable: {self.import_path} returned {len(scores)} scores for"
                f" {len(completions)} completions; it must return one per completion"
            )
        if not all(math.isfinite(s) for s in scores):
            raise UserError(f"judge.callable: {self.import_path} returned a NaN or infinite score")
        return scores


def import_callable(import_path: str, key: str) -> Callable:
    """The function named by 'package.module:function'; a UserError naming `key` if not."""
    module_name, colon, attribute = import_path.partition(":")
    if not colon or not module_name or not attribute:
        raise UserError(f"{key}: write 'package.module:function', got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"{key}: cannot import module {module_name!r} ({e}); install it or put its"
            " directory on PYTHONPATH"
        ) from None
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise UserError(f"{key}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise UserError(f"{key}: {import_path} is not callable")
    return function


def load_judge(
    cfg: JudgeConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Judge | None:
    """The judge `cfg` asks for, or None for `kind: none`."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "lexicon":
        return LexiconJudge()
    if cfg.kind == "reward_model":
        return RewardModelJudge(cfg.path, cfg.batch_size, cfg.max_length, dtype, device)
    if cfg.kind == "callable":
        return CallableJudge(cfg.callable)
    raise UserError(f"judge.kind: unknown judge {cfg.kind!r}")


def pairwise_outcomes(scores: Sequence[float], other_scores: Sequence[float]) -> list[float]:
    """Per item: 1.0 if `scores[i]` beats `other_scores[i]`, 0.5 on an exact tie, else 0.0.

    Their mean is the win rate with ties counted as half a win.
    """
    if len(scores) != len(other_scores):
        raise ValueError(f"{len(scores)} scores against {len(other_scores)}")
    return [
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores, strict=True)
    ]


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def _reward_model_dir(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"judge.path: {path_text} is not a local model directory (no config.json); set it"
            " to the folder a sequence-classification model was saved to with save_pretrained"
        )
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"judge.path: {path} has no .safetensors weights; privdpo loads only safetensors"
        )
    return path
