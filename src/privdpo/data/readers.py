"""Read rows from local data files, one `Row` per record, never dropping one silently.

privdpo runs on machines without network access, so only local paths are read: JSONL,
JSON arrays, Parquet, CSV and directories written by `datasets.Dataset.save_to_disk`.
A record that cannot be read comes back as a `Row` with `fields=None` and a reason, so
the caller decides whether to stop or drop it; a problem with the file as a whole (missing,
wrong format, empty) raises `DataError` naming the path and the fix. File-level checks run
when `read_rows` is called (it reads the first row eagerly), not on first iteration.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privdpo.errors import DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
_SKIP_HINT = "set data.on_bad_row=drop to skip such rows"
_BOM = b"\xef\xbb\xbf"
_JSON_WS = re.compile(r"[ \t\n\r]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


# CSV has no null: these cells are missing values, not text (pandas reads them as NaN).
CSV_MISSING = frozenset({"", "NaN", "nan", "NAN", "NULL", "null", "Null", "#N/A", "<NA>"})


class DuplicateKey(ValueError):
    """A JSON object names one key twice; json.loads would silently keep the last value."""


def object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json: a dict, or DuplicateKey naming the repeated key."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(
                f"key {key!r} appears more than once in one object (JSON keeps only the last"
                " value, silently); remove the duplicate"
            )
        obj[key] = value
    return obj


@dataclass(frozen=True)
class Row:
    """One record and where it came from; `fields` is None when it could not be read."""

    where: str
    fields: dict[str, Any] | None
    reason: str | None = None
    problem: str | None = None


def read_rows(path: str | os.PathLike[str]) -> Iterator[Row]:
    """Yield every row of a local data file or save_to_disk directory, format by path.

    Raises DataError right away for file-level problems, including a file with no rows.
    """
    where = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(_missing_message(where))
    if p.is_dir():
        rows = _read_saved_dataset(p, where)
    else:
        reader = _READERS.get(p.suffix.lower())
        if reader is None:
            raise DataError(_unsupported_message(where, p))
        rows = reader(p, where)
    first = None if p.is_file() and p.stat().st_size == 0 else next(rows, None)
    if first is None:
        raise DataError(
            f"{where}: holds no rows (it is empty, or only blank lines, a header or []); "
            "point the data path at data with at least one row"
        )
    return itertools.chain([first], rows)


def _missing_message(where: str) -> str:
    """Say the path is missing, and if it looks like a Hub id or URL, how to get it here."""
    msg = f"{where}: no such file or directory; privdpo reads only local files"
    if "://" in where:
        return msg + (
            ", not URLs; download the data on a connected machine, copy it here "
            "and point the data path at the local file"
        )
    if _HUB_ID.match(where) and Path(where).suffix.lower() not in SUFFIXES:
        name = where.split("/")[1]
        return msg + (
            f" and never the Hugging Face Hub. If '{where}' is a Hub dataset id, download it "
            'on a connected machine, e.g. python -c "import datasets; '
            f"datasets.load_dataset('{where}', split='train').save_to_disk('{name}-train')\", "
            f"copy {name}-train here and point the data path at that local directory"
        )
    return msg + "; check the path (relative paths are resolved from the working directory)"


def _unsupported_message(where: str, p: Path) -> str:
    """Name the supported formats, and hint at decompressing compressed files."""
    msg = (
        f"{where}: unsupported file type ({p.suffix or 'no extension'}); supported are "
        f"{', '.join(SUFFIXES)} files and directories written by datasets.Dataset.save_to_disk"
    )
    if p.suffix.lower() in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        msg += "; decompress the file first"
    return msg + "; convert the data to one of these"


def _read_jsonl(p: Path, where: str) -> Iterator[Row]:
    """One JSON object per physical line; blank lines are not rows."""
    with _open(p, where, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            here = f"{where}:{lineno}"
            skipped = 3 if lineno == 1 and raw.startswith(_BOM) else 0
            try:
                text = raw[skipped:].decode("utf-8")
            except UnicodeDecodeError as e:
                col = e.start + skipped + 1
                byte = raw[e.start + skipped]
                yield Row(
                    here,
                    None,
                    "not_utf8",
                    f"byte 0x{byte:02x} at byte column {col} is not valid UTF-8; "
                    f"re-save the file as UTF-8 or {_SKIP_HINT}",
                )
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text, object_pairs_hook=object_without_duplicates)
            except json.JSONDecodeError as e:
                yield Row(
                    here,
                    None,
                    "malformed_json",
                    f"malformed JSON ({e.msg} at column {e.colno}); fix the line or {_SKIP_HINT}",
                )
                continue
            except DuplicateKey as e:
                yield Row(here, None, "duplicate_key", f"{e}, or {_SKIP_HINT}")
                continue
            yield _object_row(here, obj, "line")


def _read_json(p: Path, where: str) -> Iterator[Row]:
    """A top-level array of objects; each row's line is where its element starts."""
    with _open(p, where, "rb") as f:
        data = f.read()
    if data.startswith(_BOM):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{where}:{line}: byte 0x{data[e.start]:02x} at byte column {col} is not valid "
            "UTF-8; re-save the file as UTF-8"
        ) from None
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}:{e.lineno}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "fix the file, or for one object per line use a .jsonl file"
        ) from None
    if not isinstance(doc, list):
        raise DataError(
            f"{where}: the top level is a JSON {_JSON_TYPES.get(type(doc), 'value')}, "
            "but a .json file must hold an array of objects ([{...}, {...}]); "
            "wrap the rows in [...] or use one object per line in a .jsonl file"
        )
    # The document is valid, so walking it element by element cannot fail except on a
    # duplicated key; raw_decode gives each element's offset, which json.loads does not.
    strict = json.JSONDecoder(object_pairs_hook=object_without_duplicates)
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, _JSON_WS.match(text).end() + 1).end()  # past '['
    line, counted = 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = strict.raw_decode(text, pos)
            row = _object_row(f"{where}:{line}", obj, "array element")
        except DuplicateKey as e:
            _, end = decoder.raw_decode(text, pos)
            row = Row(f"{where}:{line}", None, "duplicate_key", f"{e}, or {_SKIP_HINT}")
        yield row
        pos = _JSON_WS.match(text, end).end()
        if text[pos] == ",":
            pos = _JSON_WS.match(text, pos + 1).end()


def _read_csv(p: Path, where: str) -> Iterator[Row]:
    """Header row names the columns; values stay strings, except the cells of CSV_MISSING
    (empty, NaN, NULL, ...), which are missing values (None); `where` is a record's first
    line."""
    with _open(p, where, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, strict=True)
        header: list[str] | None = []
        while header is not None and len(header) <= 1 and not "".join(header).strip():
            at = f"{where}:{reader.line_num + 1}"  # blank lines before the header are skipped
            header = _csv_next(reader, at)
        if header is None:
            return
        _check_csv_header(header, at)
        start = reader.line_num + 1
        while (record := _csv_next(reader, f"{where}:{start}")) is not None:
            here, start = f"{where}:{start}", reader.line_num + 1
            if not record:  # a blank line, not a row
                continue
            if len(record) != len(header):
                yield Row(
                    here,
                    None,
                    "wrong_column_count",
                    f"record has {len(record)} fields but the header has {len(header)} "
                    f"columns; quote fields that contain commas or newlines, or {_SKIP_HINT}",
                )
                continue
            bad = next(
                ((k, v) for k, v in zip(header, record, strict=True) if _undecodable(v)), None
            )
            if bad is not None:
                byte = ord(_undecodable(bad[1])) - 0xDC00
                yield Row(
                    here,
                    None,
                    "not_utf8",
                    f"byte 0x{byte:02x} in column '{bad[0]}' is not valid UTF-8; "
                    f"re-save the file as UTF-8 or {_SKIP_HINT}",
                )
                continue
            yield Row(
                here,
                {k: None if v in CSV_MISSING else v for k, v in zip(header, record, strict=True)},
            )


def _csv_next(reader: Any, where: str) -> list[str] | None:
    """Next CSV record, or None at the end; a broken quote cannot be resynced, so stop."""
    try:
        return next(reader, None)
    except csv.Error as e:
        raise DataError(
            f"{where}: CSV record cannot be parsed ({e}); fix the quoting "
            "(a field containing quotes must be quoted, with inner quotes doubled); "
            "for fields over 128 KiB, which csv refuses, use .jsonl or .parquet"
        ) from None


def _check_csv_header(header: list[str], at: str) -> None:
    """The first line must name every column once, in UTF-8."""
    if any(not name.strip() for name in header):
        raise DataError(
            f"{at}: no header row (the first line has an empty column name); the first "
            "line of a CSV file must name the columns, e.g. prompt,chosen,rejected"
        )
    if any(_undecodable(name) for name in header):
        raise DataError(f"{at}: the header is not valid UTF-8; re-save the file as UTF-8")
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        raise DataError(
            f"{at}: the header names column(s) {', '.join(dupes)} more than once; "
            "give every column a distinct name"
        )


def _undecodable(value: str) -> str | None:
    """The first byte that surrogateescape smuggled in, as its surrogate, if any."""
    return next((ch for ch in value if "\udc80" <= ch <= "\udcff"), None)


def _read_parquet(p: Path, where: str) -> Iterator[Row]:
    """Batches through pyarrow, so large files are not held in memory at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        number = 0
        for batch in pf.iter_batches(batch_size=1024):
            for fields in batch.to_pylist():
                number += 1
                yield Row(f"{where}:row {number}", fields)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{where}: not a readable Parquet file ({e}); re-export it, or check it is "
            "not truncated or another format with a .parquet name"
        ) from None


def _read_saved_dataset(p: Path, where: str) -> Iterator[Row]:
    """A datasets.Dataset.save_to_disk directory, loaded from disk only."""
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text("utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
        example = os.path.join(where, splits[0] if splits else "train")
        raise DataError(
            f"{where}: a DatasetDict with splits {', '.join(splits) or '(none)'}; point the "
            f"data path at one split's sub-directory, e.g. {example}"
        )
    if not (p / "state.json").is_file():
        found = sorted(c.name for c in p.iterdir() if c.suffix.lower() in SUFFIXES)
        hint = f"; it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}"
        raise DataError(
            f"{where}: a directory, but not one written by datasets.Dataset.save_to_disk "
            f"(no state.json{hint if found else ''}); point the data path at a data file "
            f"({', '.join(SUFFIXES)}) or a save_to_disk directory"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # a damaged directory can fail in many ways; all are the user's
        raise DataError(
            f"{where}: cannot load the saved dataset ({type(e).__name__}: {e}); save it "
            "again with datasets.Dataset.save_to_disk"
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{where}: holds a {type(ds).__name__}, not a single Dataset")
    number = 0
    # Arrow format ignores any saved torch/numpy format, giving the same plain values as Parquet.
    for table in ds.with_format("arrow").iter(batch_size=1024):
        for fields in table.to_pylist():
            number += 1
            yield Row(f"{where}:row {number}", fields)


def _object_row(here: str, obj: Any, what: str) -> Row:
    """A Row for a decoded JSON value, which must be an object to be a row."""
    if isinstance(obj, dict):
        return Row(here, obj)
    kind = _JSON_TYPES.get(type(obj), "value")
    return Row(
        here,
        None,
        "not_an_object",
        f"{what} is a JSON {kind}, not an object; each row must be an object "
        f'like {{"prompt": ...}}; fix it or {_SKIP_HINT}',
    )


def _open(p: Path, where: str, mode: str, **kwargs: Any) -> Any:
    """open() with an unreadable file turned into a DataError that names it."""
    try:
        return open(p, mode, **kwargs)
    except OSError as e:
        raise DataError(f"{where}: cannot open ({e.strerror}); check its permissions") from None


_READERS: dict[str, Callable[[Path, str], Iterator[Row]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}
