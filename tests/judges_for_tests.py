"""Judges importable by path (`judges_for_tests:NAME`) for the callable-judge tests."""

from __future__ import annotations


def prefer_long(prompts: list[str], completions: list[str]) -> list[float]:
    """Longer completions are better."""
    return [float(len(c)) for c in completions]


def constant(prompts: list[str], completions: list[str]) -> list[float]:
    """Every completion is as good as any other: every comparison is a tie."""
    return [1.0 for _ in completions]


def wrong_length(prompts: list[str], completions: list[str]) -> list[float]:
    return [0.0]


not_a_function = 3
