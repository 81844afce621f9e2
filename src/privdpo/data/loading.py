"""From rows to training units, and the train/eval split: shared by SFT and preference
data. Every row read is kept, or reported to the summary (which drops or stops). With a
`scrub` section enabled, rows are scrubbed of personal identifiers as they are read."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

from privdpo.config import DataConfig, ScrubConfig
from privdpo.data.readers import Row, read_rows
from privdpo.data.summary import DataSummary
from privdpo.data.tokenize import BadRow
from privdpo.errors import DataError

# The user id of a row without one under data.missing_user_id=own_user: unique per row,
# and no real id starts with a NUL character.
OWN_USER_PREFIX = "\0own-user:"


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
    cfg: DataConfig,
    seed: int,
    read: Callable[[str, DataSummary, Iterable[Row]], list],
    what: str,
    scrub: ScrubConfig | None = None,
) -> tuple[list, list, DataSummary]:
    """Train and eval units: `data.eval` read with `read(path, summary, rows)`, or held out
    of `data.train`; the rows scrubbed first when `scrub.enabled`."""
    summary = DataSummary(cfg.on_bad_row)
    scrubber = None
    if scrub is not None and scrub.enabled:
        from privdpo.prep.scrub import Scrubber

        scrubber = Scrubber(scrub, progress=False)

    def rows_of(path: str) -> Iterator[Row]:
        rows = read_rows(path)
        return scrubber.scrub_read_rows(path, rows) if scrubber is not None else rows

    train = read(cfg.train, summary, rows_of(cfg.train))
    if cfg.eval is not None:
        evals = read(cfg.eval, summary, rows_of(cfg.eval))
    else:
        train, evals = split_eval(train, cfg.eval_fraction, seed)
    if scrubber is not None:
        summary.scrub = scrubber.summary()
    if not train:
        # Nothing is written before this error, so the summary goes into it.
        raise DataError(
            f"{cfg.train}: no usable {what} left ({summary.total_dropped} dropped):\n"
            f"{summary.table()}"
        )
    if cfg.missing_user_id == "own_user":
        for item in train + evals:
            if item.user_id is None:
                item.user_id = OWN_USER_PREFIX + item.where
                summary.note(
                    "own_user",
                    item.where,
                    "no user id: a user of its own (data.missing_user_id=own_user)",
                )
    summary.kept["train"] = len(train)
    summary.kept["eval"] = len(evals)
    return train, evals, summary


def require_user_ids(items: list, cfg) -> None:
    """Under privacy.unit=user every item must name its user: a blank or missing id is an
    error naming the rows, unless data.missing_user_id=own_user made each its own user."""
    if not (cfg.privacy.enabled and cfg.privacy.unit == "user"):
        return
    missing = [it.where for it in items if it.user_id is None]
    if missing:
        raise DataError(
            f"{missing[0]}: privacy.unit=user needs a user id on every row, but"
            f" {len(missing)} rows have none in column {cfg.data.user_id_column!r} (blank or"
            f" missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Fill"
            " it in, set data.user_id_column to the column that has it, or set"
            " data.missing_user_id=own_user to make each such row a user of its own"
        )
