"""`privdpo scrub INPUT OUTPUT`, and scrubbing on load: personal identifiers in the text
fields replaced by typed placeholders (`<EMAIL>`) or by salted pseudonyms.

Presidio finds them (`prep/recognizers.py`) and replaces them (its AnonymizerEngine, which
also resolves overlapping finds: the longer or higher-scored one wins). Only text fields
are touched (strings in them; a chat message's `content`, never its `role`); every row and
every other field is kept. A pseudonym is an HMAC of the value under a secret salt, so one
phone number is one token everywhere in the dataset, and without the salt the token says
nothing about the number. Rows are scrubbed in parallel, a chunk per worker process, in
order. The summary counts what was found per entity type and field, and rows touched;
it never holds a value (nor the salt).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from privdpo.config import ScrubConfig, ScrubRunConfig
from privdpo.data.readers import Row
from privdpo.errors import UserError
from privdpo.prep.entities import NER_ENTITIES, PATTERN_ENTITIES, TEXT_FIELDS
from privdpo.prep.tables import read_table, table_format, write_table

SUMMARY_FILE = "scrub_summary.json"
PSEUDONYM_HEX = 10  # 40 bits: collisions within a dataset are negligible
MIN_SALT_BYTES = 16


def load_salt(cfg: ScrubConfig) -> bytes:
    """The pseudonym salt: the bytes of `salt_file`, or fresh random ones for this run."""
    if cfg.salt_file is None:
        return os.urandom(32)
    path = Path(cfg.salt_file).expanduser()
    try:
        salt = path.read_bytes().strip()
    except OSError as e:
        raise UserError(f"scrub.salt_file: cannot read {path} ({e.strerror})") from None
    if len(salt) < MIN_SALT_BYTES:
        raise UserError(
            f"scrub.salt_file: {path} holds {len(salt)} bytes; a salt needs at least"
            f" {MIN_SALT_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
        )
    return salt


def normalized(entity: str, text: str) -> str:
    """The form of a value that decides its pseudonym: case and separators do not matter
    (010-1234-5678, 01012345678 and +82 10 1234 5678 are one number)."""
    if entity in ("EMAIL", "URL", "IP_ADDRESS"):
        return text.strip().lower()
    if entity in NER_ENTITIES:
        return " ".join(text.split()).casefold()
    if entity == "PHONE_NUMBER":  # (201) 555-0123 and +1 201-555-0123 are one number
        import phonenumbers

        try:
            number = phonenumbers.parse(text, "US")
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        except phonenumbers.NumberParseException:
            pass
    compact = re.sub(r"[^0-9A-Za-z]", "", text).upper()
    if entity == "KR_PHONE" and text.lstrip().startswith("+82"):
        compact = compact[2:] if compact[2:].startswith("0") else "0" + compact[2:]
    return compact


def pseudonym(salt: bytes, entity: str, text: str) -> str:
    digest = hmac.new(salt, f"{entity}\0{normalized(entity, text)}".encode(), hashlib.sha256)
    return f"<{entity}_{digest.hexdigest()[:PSEUDONYM_HEX]}>"


def ner_note(cfg: ScrubConfig) -> str:
    """One line on whether names and places are found, for the summary and the log."""
    ner = [e for e in NER_ENTITIES if e in cfg.entities]
    if cfg.spacy_model is None:
        return "pattern-only: no scrub.spacy_model, so names and places are not found"
    return f"NER with the local spaCy pipeline {cfg.spacy_model}: {', '.join(ner) or 'none'}"


class TextScrubber:
    """One process's analyzer and anonymizer; scrubs the text fields of one row."""

    def __init__(self, cfg: ScrubConfig, salt: bytes):
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        from privdpo.prep.recognizers import build_analyzer

        self.cfg = cfg
        self.entities = [
            e
            for e in cfg.entities
            if e in PATTERN_ENTITIES or (e in NER_ENTITIES and cfg.spacy_model is not None)
        ]
        self.analyzer = build_analyzer(
            self.entities, cfg.language, cfg.phone_regions, cfg.kr_rrn_check_digit, cfg.spacy_model
        )
        self.anonymizer = AnonymizerEngine()
        if cfg.replace == "placeholder":
            self.operators = {
                e: OperatorConfig("replace", {"new_value": f"<{e}>"}) for e in self.entities
            }
        else:
            self.operators = {
                e: OperatorConfig("custom", {"lambda": functools.partial(pseudonym, salt, e)})
                for e in self.entities
            }

    def text(self, text: str, field: str, counts: dict[str, dict[str, int]]) -> str:
        if not text.strip():
            return text
        found = self.analyzer.analyze(
            text,
            language=self.cfg.language,
            entities=self.entities,
            score_threshold=self.cfg.score_threshold,
        )
        if not found:
            return text
        result = self.anonymizer.anonymize(text, found, operators=self.operators)
        for item in result.items:
            by_field = counts.setdefault(item.entity_type, {})
            by_field[field] = by_field.get(field, 0) + 1
        return result.text

    def value(self, value, field: str, counts: dict) -> object:
        """Strings scrubbed wherever they sit in a field, a message's role excepted."""
        if isinstance(value, str):
            return self.text(value, field, counts)
        if isinstance(value, list):
            return [self.value(v, field, counts) for v in value]
        if isinstance(value, dict):
            return {k: v if k == "role" else self.value(v, field, counts) for k, v in value.items()}
        return value

    def row(self, fields: dict, text_fields: Iterable[str]) -> tuple[dict, dict]:
        """(the row with its text fields scrubbed, counts per entity type and field)."""
        counts: dict[str, dict[str, int]] = {}
        out = dict(fields)
        for field in text_fields:
            if field in out:
                out[field] = self.value(out[field], field, counts)
        return out, counts


_WORKER: TextScrubber | None = None  # the scrubber of a worker process


def _start_worker(cfg: ScrubConfig, salt: bytes) -> None:
    global _WORKER
    _WORKER = TextScrubber(cfg, salt)


def _scrub_chunk(args: tuple[list[dict], tuple[str, ...]]) -> list[tuple[dict, dict]]:
    rows, fields = args
    return [_WORKER.row(r, fields) for r in rows]


class Scrubber:
    """Scrubs rows in parallel with one salt, and adds up what it found."""

    def __init__(self, cfg: ScrubConfig, progress: bool = True):
        self.cfg = cfg
        self.salt = load_salt(cfg) if cfg.replace == "pseudonym" else b""
        self.fields = tuple(cfg.fields or TEXT_FIELDS)
        self.progress = progress
        self.workers = cfg.workers or len(os.sched_getaffinity(0))
        self.counts: dict[str, dict[str, int]] = {}
        self.rows_read = 0
        self.rows_touched = 0
        self.fields_seen: set[str] = set()
        self._local: TextScrubber | None = None

    def scrub_rows(self, rows: list[dict]) -> list[dict]:
        """The rows with their text fields scrubbed, in order."""
        chunk = self.cfg.chunk_rows
        tasks = [(rows[i : i + chunk], self.fields) for i in range(0, len(rows), chunk)]
        bar = tqdm(total=len(rows), unit="row", desc="scrub", disable=not self.progress)
        out = []
        workers = min(self.workers, len(tasks))
        if workers <= 1:
            if self._local is None:
                self._local = TextScrubber(self.cfg, self.salt)
            results = (self._scrub_local(task) for task in tasks)
            out = self._collect(results, bar)
        else:
            # fork: workers start with Presidio already imported (DataLoader does the same).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(workers, _start_worker, (self.cfg, self.salt)) as pool:
                out = self._collect(pool.imap(_scrub_chunk, tasks), bar)
        bar.close()
        return out

    def _scrub_local(self, task: tuple[list[dict], tuple[str, ...]]) -> list[tuple[dict, dict]]:
        rows, fields = task
        return [self._local.row(r, fields) for r in rows]

    def _collect(self, results, bar) -> list[dict]:
        out = []
        for part in results:
            for row, counts in part:
                out.append(row)
                self.rows_read += 1
                self.fields_seen.update(f for f in self.fields if f in row)
                if counts:
                    self.rows_touched += 1
                for entity, by_field in counts.items():
                    mine = self.counts.setdefault(entity, {})
                    for field, n in by_field.items():
                        mine[field] = mine.get(field, 0) + n
            bar.update(len(part))
        return out

    def scrub_read_rows(self, path: str, rows: Iterable[Row]) -> Iterator[Row]:
        """The loaders' rows (`read_rows`), readable ones scrubbed; scrubbing on load."""
        rows = list(rows)
        readable = [r for r in rows if r.fields is not None]
        scrubbed = iter(self.scrub_rows([r.fields for r in readable]))
        for row in rows:
            yield row if row.fields is None else replace(row, fields=next(scrubbed))

    def summary(self) -> dict:
        """What was found, as counts only: never a value, never the salt."""
        totals = {e: sum(by_field.values()) for e, by_field in self.counts.items()}
        return {
            "rows": self.rows_read,
            "rows_touched": self.rows_touched,
            "replace": self.cfg.replace,
            "fields": sorted(self.fields_seen),
            "entities": {e: dict(sorted(self.counts[e].items())) for e in sorted(self.counts)},
            "totals": dict(sorted(totals.items())),
            "looked_for": [e for e in self.cfg.entities if e in PATTERN_ENTITIES]
            + ([e for e in NER_ENTITIES if e in self.cfg.entities] if self.cfg.spacy_model else []),
            "ner": ner_note(self.cfg),
            "score_threshold": self.cfg.score_threshold,
        }


def summary_table(summary: dict) -> str:
    """The summary as a table: one line per entity type, a column per field."""
    fields = sorted({f for by_field in summary["entities"].values() for f in by_field})
    width = max([len(e) for e in summary["entities"]] + [len("entity")])
    lines = [
        f"scrubbed {summary['rows']} rows: {summary['rows_touched']} touched"
        f" ({summary['replace']}s)",
        summary["ner"],
    ]
    if not summary["entities"]:
        return "\n".join([*lines, "no identifiers found"])
    header = f"  {'entity':<{width}}" + "".join(f"  {f:>9}" for f in fields) + "      total"
    lines.append(header)
    for entity, by_field in summary["entities"].items():
        cells = "".join(f"  {by_field.get(f, 0):>9}" for f in fields)
        lines.append(f"  {entity:<{width}}{cells}  {summary['totals'][entity]:>9}")
    return "\n".join(lines)


def run_scrub(input_path: str, output_path: str, cfg: ScrubRunConfig) -> Path:
    """`privdpo scrub`: read INPUT, scrub it, write OUTPUT and scrub_summary.json beside it."""
    source, target = Path(input_path), Path(output_path)
    if table_format(target, "OUTPUT") != table_format(source, "INPUT"):
        raise UserError(
            f"{target}: OUTPUT must have INPUT's format ({source.suffix}); scrub writes every"
            " row back as it was read, so convert the file before or after"
        )
    if target.exists():
        if source.exists() and target.resolve() == source.resolve():
            raise UserError(f"{target}: OUTPUT is INPUT; write the scrubbed file elsewhere")
        if not cfg.output.overwrite:
            raise UserError(
                f"{target}: already exists; choose another OUTPUT or set output.overwrite=true"
            )
    table = read_table(source)
    scrubber = Scrubber(cfg.scrub, progress=cfg.output.progress_bar)
    rows = scrubber.scrub_rows(table.rows)
    write_table(target, table, rows)
    summary = {"input": str(source), "output": str(target), **scrubber.summary()}
    summary_path = target.with_name(SUMMARY_FILE)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(summary_table(summary))
    print(f"wrote {target} and {summary_path}")
    return target
