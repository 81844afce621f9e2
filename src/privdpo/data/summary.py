"""The data summary: every row read is either kept, dropped with a reason, or stops the run.

Dropping is only allowed when the config says so (`data.on_bad_row=drop`); then each
reason is counted with the locations of the rows it hit, printed as a short table, and
saved as `data_summary.json` in the run directory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from privdpo.errors import DataError

MAX_LOCATIONS = 20  # locations listed per reason; the count is always complete


class DataSummary:
    def __init__(self, on_bad_row: str):
        self.on_bad_row = on_bad_row
        self.rows_read: dict[str, int] = defaultdict(int)
        self.kept: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, dict] = {}
        self.notes: dict[str, dict] = {}
        self.scrub: dict | None = None  # the scrub summary, when rows were scrubbed on load

    def read(self, file: str) -> None:
        self.rows_read[file] += 1

    def bad_row(self, where: str, reason: str, problem: str, policy: str | None = None) -> None:
        """Stop on a bad row, or count it as dropped when the config allows dropping.
        `policy` ("error" or "drop") overrides `data.on_bad_row` for reasons that have a
        setting of their own (e.g. `data.boundary_mismatch`)."""
        if (policy or self.on_bad_row) == "error":
            raise DataError(f"{where}: {problem}")
        self._add(self.dropped, reason, where, problem)

    def note(self, reason: str, where: str, detail: str) -> None:
        """A kept row that was changed (e.g. truncated): counted, never silent."""
        self._add(self.notes, reason, where, detail)

    @staticmethod
    def _add(table: dict, reason: str, where: str, detail: str) -> None:
        entry = table.setdefault(reason, {"count": 0, "detail": detail, "rows": []})
        entry["count"] += 1
        if len(entry["rows"]) < MAX_LOCATIONS:
            entry["rows"].append(where)

    @property
    def total_dropped(self) -> int:
        return sum(e["count"] for e in self.dropped.values())

    def to_dict(self) -> dict:
        return {
            "rows_read": dict(self.rows_read),
            "kept": dict(self.kept),
            "dropped": self.dropped,
            "notes": self.notes,
        }

    def save(self, path: Path) -> None:
        """Write the summary to `path` (and scrub_summary.json beside it, if scrubbed)."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        if self.scrub is not None:
            scrub_path = path.with_name("scrub_summary.json")
            scrub_path.write_text(json.dumps(self.scrub, indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        lines = ["data summary"]
        for file, n in self.rows_read.items():
            lines.append(f"  read    {n:>7}  {file}")
        for split, n in self.kept.items():
            lines.append(f"  kept    {n:>7}  {split}")
        for reason, e in self.dropped.items():
            lines.append(f"  dropped {e['count']:>7}  {reason} (first: {e['rows'][0]})")
        for reason, e in self.notes.items():
            lines.append(f"  note    {e['count']:>7}  {reason} (first: {e['rows'][0]})")
        if self.scrub is not None:
            found = sum(sum(by_field.values()) for by_field in self.scrub["entities"].values())
            lines.append(
                f"  scrubbed {self.scrub['rows_touched']:>6}  rows touched, {found} identifiers"
                f" replaced ({self.scrub['ner']})"
            )
        return "\n".join(lines)
