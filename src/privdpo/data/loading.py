"""From rows to training units, and the train/eval split: shared by SFT and preference
data. Every row read is kept, or reported to the summary (which drops or stops)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from privdpo.config import DataConfig
from privdpo.data.readers import Row
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import BadRow
from privdpo.errors import DataError


def convert_rows(
    path: str, rows: Iterable[Row], summary: DataSummary, convert: Callable[[Row], object]
) -> list:
    """`convert` each readable row; unreadable rows and `BadRow`s go to the summary."""
    units = []
    for row in rows:
        summary.read(path)
        if row.fields is None:
            summary.bad_row(row.where, row.reason, row.problem)
            continue
        try:
            units.append(convert(row))
        except BadRow as e:
            fix = "" if e.policy else " (or set data.on_bad_row=drop to skip such rows)"
            summary.bad_row(row.where, e.reason, f"{e}{fix}", e.policy)
    return units


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the examples (at least one when fraction > 0), seeded."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


def load_splits(
    cfg: DataConfig, seed: int, read: Callable[[str, DataSummary], list], what: str
) -> tuple[list, list, DataSummary]:
    """Train and eval units: `data.eval` read with `read`, or held out of `data.train`."""
    summary = DataSummary(cfg.on_bad_row)
    train = read(cfg.train, summary)
    if cfg.eval is not None:
        evals = read(cfg.eval, summary)
    else:
        train, evals = split_eval(train, cfg.eval_fraction, seed)
    if not train:
        raise DataError(
            f"{cfg.train}: no usable {what} left"
            f" ({summary.total_dropped} dropped; see the data summary above)"
        )
    summary.kept["train"] = len(train)
    summary.kept["eval"] = len(evals)
    return train, evals, summary
