"""Shared fixtures: the tiny preset's tokenizer and small data files written per test."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

# Tests are offline like the tool: nothing may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Accounting results are cached on disk (privdpo.privacy.els_accounting); tests write
    them to a temporary directory, never to the user's ~/.cache."""
    os.environ["PRIVDPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("privdpo-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from privdpo.models import PRESETS, build_tiny_tokenizer

    return build_tiny_tokenizer(PRESETS["tiny"]["vocab_size"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int) -> list[dict]:
    """Plain prompt/completion rows with a pattern a tiny model can learn."""
    words = ["good", "bad", "great", "awful", "fine", "nice", "poor", "lovely"]
    return [
        {
            "prompt": f"Review {i}: the movie was",
            "completion": f" {words[i % len(words)]} and the music was {words[(i * 3) % len(words)]}.",
            "user_id": f"u{i % 5}",
        }
        for i in range(n)
    ]


class Crash(Exception):
    """Stands for the process dying."""


@contextlib.contextmanager
def crash_after_step(step: int):
    """The run dies right after writing the metrics of `step`, as a killed process would;
    its newest checkpoint is then older than its metrics."""
    from privdpo.metrics import MetricsLogger

    original = MetricsLogger.log

    def crashing_log(self, logged_step, values):
        original(self, logged_step, values)
        if logged_step == step:
            raise Crash

    MetricsLogger.log = crashing_log
    try:
        with pytest.raises(Crash):
            yield
    finally:
        MetricsLogger.log = original


TIMING = {"tokens_per_second", "step_seconds"}


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics records less the wall-clock ones, which differ between equal runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]
