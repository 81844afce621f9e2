"""Read a data file as a table of rows and write it back in the same format, every row
and every field kept as it was (the loaders' readers normalize; these do not).

Formats: JSONL (one object per line), JSON (an array of objects), CSV (a header, then
strings), Parquet (its schema is written back unchanged). A row that cannot be read is an
error naming the file and line: a scrubber cannot vouch for text it could not parse.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privdpo.data.readers import DuplicateKey, object_without_duplicates
from privdpo.errors import DataError

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass
class Table:
    """The rows of a file, its format, and what writing it back needs (CSV header,
    Parquet schema)."""

    format: str
    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    schema: Any = None


def table_format(path: Path, what: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: {what} must be a {', '.join(FORMATS)} file (a save_to_disk directory:"
            " export it to Parquet first)"
        )
    return fmt


def read_table(path: str | os.PathLike[str]) -> Table:
    path = Path(path)
    fmt = table_format(path, "the input")
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a local data file")
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[
        fmt
    ](path)


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=object_without_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix it") from None
    except DuplicateKey as e:
        raise DataError(f"{where}: {e}") from None


def _read_jsonl(path: Path) -> Table:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = _loads(line, f"{path}:{lineno}")
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: not a JSON object; each line must be a row")
            rows.append(obj)
    return Table("jsonl", rows)


def _read_json(path: Path) -> Table:
    doc = _loads(path.read_text(encoding="utf-8-sig"), str(path))
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise DataError(f"{path}: a .json file must hold an array of objects ([{{...}}, ...])")
    return Table("json", doc)


def _read_csv(path: Path) -> Table:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            records = list(reader)
        except csv.Error as e:
            raise DataError(
                f"{path}:{reader.line_num}: CSV record cannot be parsed ({e})"
            ) from None
    records = [r for r in records if r]
    if not records:
        raise DataError(f"{path}: holds no header row")
    header, body = records[0], records[1:]
    for i, record in enumerate(body, 2):
        if len(record) != len(header):
            raise DataError(
                f"{path}: record {i} has {len(record)} fields but the header has"
                f" {len(header)}; quote fields that contain commas or newlines"
            )
    return Table("csv", [dict(zip(header, r, strict=True)) for r in body], columns=header)


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return Table("parquet", table.to_pylist(), columns=table.column_names, schema=table.schema)


def write_table(path: str | os.PathLike[str], table: Table, rows: list[dict]) -> None:
    """Write `rows` (the table's rows, changed) to `path` in the table's format, through a
    temporary file, so a failed write leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    if table.format == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif table.format == "json":
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif table.format == "csv":
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table.columns)
            writer.writerows([row[c] for c in table.columns] for row in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp)
    tmp.replace(path)
