"""Shared fixtures: the tiny preset's tokenizer and small data files written per test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests are offline like the tool: nothing may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]


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
