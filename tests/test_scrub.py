"""`privdpo scrub` on a generated corpus with planted identifiers of every type (Korean ones
with valid and invalid check digits): recall and precision per type, nothing planted left
in any file the run writes, rows and other fields unchanged, consistent pseudonyms; the
formats, scrubbing on load, NER only from a local spaCy pipeline, and no network."""

from __future__ import annotations

import json
import re
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from privdpo.cli import main
from privdpo.config import DataConfig, ScrubConfig
from privdpo.prep.entities import PATTERN_ENTITIES
from privdpo.prep.scrub import Scrubber, TextScrubber

sys.path.insert(0, str(REPO / "benchmarks"))
import pii_corpus  # noqa: E402

sys.path.pop(0)

ROWS = 2000
TEXT = ("prompt", "chosen", "rejected")
TOKEN = re.compile(r"<([A-Z_]+?)(?:_([0-9a-f]{10}))?>")


@pytest.fixture(scope="module")
def corpus() -> pii_corpus.Corpus:
    return pii_corpus.generate(ROWS, seed=14)


def scrub(tmp_path: Path, corpus, *overrides: str) -> tuple[list[dict], Path]:
    (tmp_path / "in").mkdir(exist_ok=True)
    source = write_jsonl(tmp_path / "in" / "corpus.jsonl", corpus.rows)
    out = tmp_path / "out" / "scrubbed.jsonl"
    argv = ["scrub", source, out, "output.progress_bar=false", "scrub.workers=2", *overrides]
    assert main([str(a) for a in argv]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return rows, out.parent


@pytest.fixture(scope="module")
def scrubbed(corpus, tmp_path_factory):
    """The corpus scrubbed once, with pseudonyms: each is typed (<KR_PHONE_3fa9...>), so
    one run serves the accuracy and the consistency tests."""
    work = tmp_path_factory.mktemp("scrubbed")
    salt = work / "salt"
    salt.write_text("a secret salt of thirty-two bytes")
    return scrub(work, corpus, "scrub.replace=pseudonym", f"scrub.salt_file={salt}")


def test_recall_and_precision_per_entity_type(corpus, scrubbed):
    """Each field's placeholders, by type, against what was planted there: a placeholder
    of a type beyond the planted count is a false positive, a planted one without a
    placeholder a miss. Decoys (wrong check digits) stay as they are, but for the few that
    another type's rules accept (a 13-digit non-RRN passing Luhn is a card number): those
    count as that type's false positives."""
    rows, _ = scrubbed
    found, planted, hits = Counter(), Counter(), Counter()
    decoys, kept = 0, 0
    for row, plants in zip(rows, corpus.plants, strict=True):
        for field in TEXT:
            got = Counter(m.group(1) for m in TOKEN.finditer(row[field]))
            want = Counter(p.entity for p in plants if p.field == field and p.entity)
            for entity in set(got) | set(want):
                found[entity] += got[entity]
                planted[entity] += want[entity]
                hits[entity] += min(got[entity], want[entity])
            for decoy in (p for p in plants if p.field == field and p.entity is None):
                decoys += 1
                kept += decoy.value in row[field]
    for entity in PATTERN_ENTITIES:
        assert planted[entity] >= 150, entity  # enough of each to measure
        recall, precision = hits[entity] / planted[entity], hits[entity] / found[entity]
        assert recall >= 0.99 and precision >= 0.95, (entity, recall, precision)
    assert set(found) <= set(PATTERN_ENTITIES)
    assert decoys >= 300 and kept / decoys >= 0.97, (kept, decoys)


def test_no_planted_value_is_left_in_any_file_the_run_writes(corpus, scrubbed):
    _, out_dir = scrubbed
    files = sorted(out_dir.iterdir())
    assert {f.name for f in files} == {"scrubbed.jsonl", "scrub_summary.json"}
    texts = [f.read_text(encoding="utf-8") for f in files]
    values = {p.value for plants in corpus.plants for p in plants if p.entity}
    left = [v for v in values if any(v in t for t in texts)]
    assert not left, left[:10]
    summary = json.loads((out_dir / "scrub_summary.json").read_text())
    assert "pattern-only" in summary["ner"]
    assert summary["rows"] == ROWS and 0 < summary["rows_touched"] <= ROWS
    counted = sum(sum(by_field.values()) for by_field in summary["entities"].values())
    output = (out_dir / "scrubbed.jsonl").read_text(encoding="utf-8")
    assert counted == len(TOKEN.findall(output))
    assert set(summary["entities"]["EMAIL"]) == set(TEXT)  # per field


def test_every_row_and_every_other_field_is_kept(corpus, scrubbed):
    rows, _ = scrubbed
    assert len(rows) == len(corpus.rows)
    for before, after in zip(corpus.rows, rows, strict=True):
        assert list(after) == list(before)
        assert {k: v for k, v in after.items() if k not in TEXT} == {
            k: v for k, v in before.items() if k not in TEXT
        }


def test_pseudonyms_are_consistent_across_rows(corpus, scrubbed):
    """One identifier (whatever its format: 010-..., +82 10-..., digits only) is one
    pseudonym everywhere; two identifiers are two."""
    rows, out_dir = scrubbed
    token_of: dict[tuple, set] = {}
    compared = 0
    for row, plants in zip(rows, corpus.plants, strict=True):
        for field in TEXT:
            tokens = [m for m in TOKEN.finditer(row[field])]
            mine = [p for p in plants if p.field == field and p.entity]
            if [m.group(1) for m in tokens] != [p.entity for p in mine]:
                continue  # a miss or a false find: counted by the recall test
            for m, p in zip(tokens, mine, strict=True):
                token_of.setdefault((p.entity, p.key), set()).add(m.group(0))
                compared += 1
    assert compared > 0.9 * sum(1 for pl in corpus.plants for p in pl if p.entity)
    assert all(len(t) == 1 for t in token_of.values()), [
        (k, t) for k, t in token_of.items() if len(t) > 1
    ][:5]
    assert sum(1 for pl in corpus.plants for p in pl if p.entity) > len(token_of)  # recurring
    tokens = [next(iter(t)) for t in token_of.values()]
    assert len(set(tokens)) == len(tokens)  # distinct values, distinct pseudonyms
    assert "secret" not in (out_dir / "scrub_summary.json").read_text()


def test_pseudonyms_differ_between_runs_without_a_salt_file():
    a = TextScrubber(ScrubConfig(replace="pseudonym"), b"first salt, 16 bytes+")
    b = TextScrubber(ScrubConfig(replace="pseudonym"), b"other salt, 16 bytes+")
    text = "mail kim@example.com now"
    assert a.text(text, "prompt", {}) == a.text(text, "prompt", {})
    assert a.text(text, "prompt", {}) != b.text(text, "prompt", {})


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        ("주민번호 900101-1234568 입니다", "KR_RRN"),  # valid check digit
        ("주민번호 0303034123453 입니다", "KR_RRN"),  # 2000s, no dash
        ("사업자 123-45-67891 입니다", "KR_BRN"),
        ("전화 010-9876-5432 주세요", "KR_PHONE"),
        ("전화 01098765432 주세요", "KR_PHONE"),
        ("전화 +82 10-9876-5432 주세요", "KR_PHONE"),
        ("대표 02-123-4567 번", "KR_PHONE"),
        ("부산 (051) 123-4567 번", "KR_PHONE"),
        ("인터넷 070-1234-5678 번", "KR_PHONE"),
        ("call (212) 555-0123 now", "PHONE_NUMBER"),
        ("call +44 20 7946 0958 now", "PHONE_NUMBER"),
        ("card 4111-1111-1111-1111 ok", "CREDIT_CARD"),
    ],
)
def test_korean_and_other_patterns_are_found(text, entity):
    scrubber = TextScrubber(ScrubConfig(), b"")
    counts: dict = {}
    assert f"<{entity}>" in scrubber.text(text, "prompt", counts)
    assert counts == {entity: {"prompt": 1}}


@pytest.mark.parametrize(
    "text",
    [
        "주민번호 900101-1234567 입니다",  # wrong check digit
        "사업자 123-45-67890 입니다",  # wrong check digit
        "card 4111-1111-1111-1112 ok",  # fails Luhn
        "order 12 of 2024, 3 items at 1.5 each",
    ],
)
def test_lookalikes_with_a_wrong_check_digit_are_kept(text):
    assert TextScrubber(ScrubConfig(), b"").text(text, "prompt", {}) == text


def test_rrn_check_digit_can_be_waived_for_numbers_issued_since_2020():
    text = "주민번호 900101-1234567 입니다"
    cfg = ScrubConfig(kr_rrn_check_digit=False)
    assert "<KR_RRN>" in TextScrubber(cfg, b"").text(text, "prompt", {})


def test_csv_json_and_parquet_keep_their_rows_fields_and_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "mail kim@example.com", "chosen": "ok", "rejected": "no", "n": 1, "w": 0.5},
        {"prompt": "hi", "chosen": "call 010-1234-5678", "rejected": "", "n": 2, "w": None},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert (
        main(
            [
                "scrub",
                str(tmp_path / "a.json"),
                str(tmp_path / "o.json"),
                "output.progress_bar=false",
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "o.json").read_text())
    assert out[0]["prompt"] == "mail <EMAIL>" and out[1]["chosen"] == "call <KR_PHONE>"
    assert [r["n"] for r in out] == [1, 2] and out[1]["w"] is None

    csv_in = tmp_path / "a.csv"
    csv_in.write_text('prompt,chosen,rejected,user_id\n"a, kim@example.com",ok,NaN,u1\nx,y,z,\n')
    assert main(["scrub", str(csv_in), str(tmp_path / "o.csv"), "output.progress_bar=false"]) == 0
    text = (tmp_path / "o.csv").read_text()
    assert text.splitlines() == [
        "prompt,chosen,rejected,user_id",
        '"a, <EMAIL>",ok,NaN,u1',
        "x,y,z,",
    ]

    chat = [{"role": "user", "content": "my card 4111 1111 1111 1111"}]
    table = pa.Table.from_pylist(
        [
            {
                "prompt": chat,
                "chosen": [{"role": "assistant", "content": "ok"}],
                "rejected": [{"role": "assistant", "content": "no"}],
                "user_id": 7,
            }
        ]
    )
    pq.write_table(table, tmp_path / "a.parquet")
    assert (
        main(
            [
                "scrub",
                str(tmp_path / "a.parquet"),
                str(tmp_path / "o.parquet"),
                "output.progress_bar=false",
            ]
        )
        == 0
    )
    back = pq.read_table(tmp_path / "o.parquet")
    assert back.schema == table.schema
    assert back.to_pylist()[0]["prompt"] == [{"role": "user", "content": "my card <CREDIT_CARD>"}]


def test_scrub_refuses_overwriting_and_a_change_of_format(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    (tmp_path / "b.jsonl").write_text("")
    cases = [
        (source, "OUTPUT is INPUT"),
        (tmp_path / "b.jsonl", "already exists"),
        (tmp_path / "b.csv", "INPUT's format"),
    ]
    for target, message in cases:
        code = main(["scrub", str(source), str(target), "output.progress_bar=false"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    code = main(["scrub", str(source), str(tmp_path / "c.jsonl"), "scrub.spacy_model=/nowhere"])
    assert code == 2 and "never downloads" in capsys.readouterr().err


def test_names_come_only_from_a_local_spacy_pipeline(tmp_path):
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [{"label": "PERSON", "pattern": "Kim Minsu"}, {"label": "GPE", "pattern": "Busan"}]
    )
    nlp.to_disk(tmp_path / "pipeline")
    text = "Kim Minsu moved to Busan, mail kim@example.com"
    plain = TextScrubber(ScrubConfig(), b"").text(text, "prompt", {})
    assert plain == "Kim Minsu moved to Busan, mail <EMAIL>"
    cfg = ScrubConfig(spacy_model=str(tmp_path / "pipeline"))
    assert (
        TextScrubber(cfg, b"").text(text, "prompt", {})
        == "<PERSON> moved to <LOCATION>, mail <EMAIL>"
    )
    assert "local spaCy pipeline" in Scrubber(cfg).summary()["ner"]


def test_scrubbing_opens_no_network_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    scrubber = TextScrubber(ScrubConfig(), b"")
    assert scrubber.text("write to lee@mail.co.kr or https://www.shop.com/a", "p", {}) == (
        "write to <EMAIL> or <URL>"
    )


def test_training_data_is_scrubbed_on_load(tmp_path, tiny_tokenizer):
    from privdpo.data.preference import load_preference_data

    rows = [
        {"prompt": f"Call me at 010-{1000 + i}-5678.", "chosen": " Sure.", "rejected": " No."}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(train=str(data), eval_fraction=0.0, max_length=64)
    train, _, summary = load_preference_data(cfg, tiny_tokenizer, 0, ScrubConfig(enabled=True))
    prompts = [tiny_tokenizer.decode(p.prompt_ids) for p in train]
    assert prompts == ["Call me at <KR_PHONE>."] * 6
    summary.save(tmp_path / "data_summary.json")
    saved = json.loads((tmp_path / "scrub_summary.json").read_text())
    assert saved["entities"] == {"KR_PHONE": {"prompt": 6}} and saved["rows_touched"] == 6
