"""Tests for privdpo.data.readers: every format, exact row locations, every error message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from privdpo.data.readers import Row, read_rows
from privdpo.errors import DataError

MESSAGES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def rows(path: Path | str) -> list[Row]:
    return list(read_rows(path))


def error(path: Path | str) -> str:
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    return str(info.value)


# --- JSONL ---------------------------------------------------------------------------


def test_jsonl_reads_fields_and_lines(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", '{"a": 1, "b": "x"}\n\n   \n{"a": 2, "b": null}\n')
    got = rows(p)
    assert [r.where for r in got] == [f"{p}:1", f"{p}:4"]
    assert [r.fields for r in got] == [{"a": 1, "b": "x"}, {"a": 2, "b": None}]
    assert all(r.reason is None and r.problem is None for r in got)


def test_ndjson_crlf_bom_and_no_final_newline(tmp_path: Path) -> None:
    p = write(tmp_path / "d.ndjson", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}')
    got = rows(p)
    assert [(r.where, r.fields) for r in got] == [(f"{p}:1", {"a": 1}), (f"{p}:2", {"a": 2})]


def test_jsonl_bad_rows_are_yielded_not_dropped(tmp_path: Path) -> None:
    p = write(
        tmp_path / "d.jsonl",
        b'{"a": 1}\n{"a": 1 "b": 2}\n{"a": "caf\xff"}\n\n[1, 2]\n"text"\n{"a": 5}\n',
    )
    got = rows(p)
    assert [r.where for r in got] == [f"{p}:{n}" for n in (1, 2, 3, 5, 6, 7)]
    assert [r.reason for r in got] == [
        None,
        "malformed_json",
        "not_utf8",
        "not_an_object",
        "not_an_object",
        None,
    ]
    assert got[0].fields == {"a": 1} and got[-1].fields == {"a": 5}
    for bad in got[1:5]:
        assert bad.fields is None
        assert "data.on_bad_row=drop" in bad.problem
    assert "malformed JSON" in got[1].problem and "column 9" in got[1].problem
    assert "0xff" in got[2].problem and "column 11" in got[2].problem
    assert "array" in got[3].problem and "string" in got[4].problem


def test_jsonl_only_blank_lines_is_empty(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", "\n  \n\n")
    msg = error(p)
    assert str(p) in msg and "no rows" in msg


# --- JSON array ----------------------------------------------------------------------


def test_json_array_lines_of_elements(tmp_path: Path) -> None:
    text = '[\n  {"a": 1},\n\n  {\n    "a": 2\n  }, {"a": 3},\n  7\n]\n'
    p = write(tmp_path / "d.json", text)
    got = rows(p)
    assert [r.where for r in got] == [f"{p}:2", f"{p}:4", f"{p}:6", f"{p}:7"]
    assert [r.fields for r in got] == [{"a": 1}, {"a": 2}, {"a": 3}, None]
    assert got[3].reason == "not_an_object" and "number" in got[3].problem


def test_json_single_line_array(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", '[{"a": "x\\ny"}, {"a": "z"}]')
    got = rows(p)
    assert [(r.where, r.fields) for r in got] == [
        (f"{p}:1", {"a": "x\ny"}),
        (f"{p}:1", {"a": "z"}),
    ]


def test_json_invalid_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", '[\n  {"a": 1},\n  {"a": 2,}\n]\n')
    msg = error(p)
    assert msg.startswith(f"{p}:3:") and "column 11" in msg and "fix the file" in msg


def test_json_not_utf8_names_line(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", b'[\n  {"a": 1},\n  {"a": "\xfe"}\n]\n')
    msg = error(p)
    assert msg.startswith(f"{p}:3:") and "0xfe" in msg and "UTF-8" in msg


def test_json_top_level_object(tmp_path: Path) -> None:
    msg = error(write(tmp_path / "d.json", '{"a": 1}'))
    assert "array" in msg and ".jsonl" in msg


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "d.parquet"])
@pytest.mark.parametrize("text", ["", "\n \n"])
def test_empty_files(tmp_path: Path, name: str, text: str) -> None:
    p = write(tmp_path / name, text)
    if name.endswith(".parquet") and text:
        return  # whitespace is simply not Parquet; covered by test_parquet_unreadable
    msg = error(p)
    assert str(p) in msg and "no rows" in msg


def test_json_empty_array(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", "[ ]\n")
    assert "no rows" in error(p)


# --- CSV -----------------------------------------------------------------------------


def test_csv_fields_and_multiline_record(tmp_path: Path) -> None:
    text = 'prompt,chosen,n\n"line one\nline two",yes,1\n\nplain,"a, b",2\n'
    p = write(tmp_path / "d.csv", text)
    got = rows(p)
    assert [r.where for r in got] == [f"{p}:2", f"{p}:5"]
    assert got[0].fields == {"prompt": "line one\nline two", "chosen": "yes", "n": "1"}
    assert got[1].fields == {"prompt": "plain", "chosen": "a, b", "n": "2"}


def test_csv_bad_records(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", b"\xef\xbb\xbfa,b\n1,caf\xe9\n1,2,3\n4,5\n")
    got = rows(p)
    assert [(r.where, r.reason) for r in got] == [
        (f"{p}:2", "not_utf8"),
        (f"{p}:3", "wrong_column_count"),
        (f"{p}:4", None),
    ]
    assert "0xe9" in got[0].problem and "'b'" in got[0].problem
    assert got[2].fields == {"a": "4", "b": "5"}


def test_csv_empty_file(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", "")
    assert str(p) in error(p) and "no rows" in error(p)


def test_csv_header_only(tmp_path: Path) -> None:
    assert "no rows" in error(write(tmp_path / "d.csv", "a,b\n"))


def test_csv_blank_lines_before_header(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", "\n\na,b\n1,2\n")
    assert [(r.where, r.fields) for r in rows(p)] == [(f"{p}:4", {"a": "1", "b": "2"})]


@pytest.mark.parametrize("text", [",,\n1,2,3\n", "a,,c\n1,2,3\n"])
def test_csv_without_header(tmp_path: Path, text: str) -> None:
    p = write(tmp_path / "d.csv", text)
    msg = error(p)
    assert msg.startswith(f"{p}:1:") and "header" in msg and "name the columns" in msg


def test_csv_header_not_utf8(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", b"a,\xffb\n1,2\n")
    assert error(p).startswith(f"{p}:1:") and "UTF-8" in error(p)


def test_csv_duplicate_header(tmp_path: Path) -> None:
    assert "more than once" in error(write(tmp_path / "d.csv", "a,a\n1,2\n"))


def test_csv_broken_quoting_stops(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", 'a,b\n1,2\n"open,3\n4,5\n')
    msg = error(p)
    assert msg.startswith(f"{p}:3:") and "quot" in msg


# --- Parquet -------------------------------------------------------------------------


def test_parquet_rows_and_messages(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    table = pa.table({"messages": MESSAGES, "score": [1.5, None], "ok": [True, False]})
    pq.write_table(table, p, row_group_size=1)
    got = rows(p)
    assert [r.where for r in got] == [f"{p}:row 1", f"{p}:row 2"]
    assert got[0].fields == {"messages": MESSAGES[0], "score": 1.5, "ok": True}
    assert got[1].fields["messages"] == MESSAGES[1] and got[1].fields["score"] is None
    assert type(got[0].fields["messages"]) is list and type(got[0].fields["messages"][0]) is dict


def test_parquet_unreadable(tmp_path: Path) -> None:
    p = write(tmp_path / "d.parquet", '{"a": 1}\n')
    msg = error(p)
    assert str(p) in msg and "Parquet" in msg and "re-export" in msg


def test_parquet_empty(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), p)
    assert "no rows" in error(p)


# --- datasets save_to_disk -----------------------------------------------------------


def test_saved_dataset_dir(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"messages": MESSAGES, "id": [7, 8]}).save_to_disk(str(d))
    got = rows(d)
    assert [r.where for r in got] == [f"{d}:row 1", f"{d}:row 2"]
    assert [r.fields for r in got] == [
        {"messages": MESSAGES[0], "id": 7},
        {"messages": MESSAGES[1], "id": 8},
    ]


def test_dataset_dict_dir_lists_splits(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "dd"
    one = datasets.Dataset.from_dict({"a": [1]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(d))
    msg = error(d)
    assert str(d) in msg and "train" in msg and "test" in msg
    assert os.path.join(str(d), "train") in msg or os.path.join(str(d), "test") in msg


def test_plain_directory(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text("{}\n")
    msg = error(tmp_path)
    assert str(tmp_path) in msg and "save_to_disk" in msg and "x.jsonl" in msg


# --- paths ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    msg = error(p)
    assert str(p) in msg and "only local files" in msg and "Hub" not in msg


def test_missing_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    msg = error("someorg/some-dataset")
    assert "someorg/some-dataset" in msg and "only local files" in msg
    assert "Hugging Face Hub" in msg and "connected machine" in msg and "copy" in msg


def test_missing_url() -> None:
    msg = error("hf://datasets/org/name")
    assert "only local files" in msg and "URL" in msg


def test_unsupported_extension(tmp_path: Path) -> None:
    p = write(tmp_path / "d.txt", "hello\n")
    msg = error(p)
    assert str(p) in msg and ".txt" in msg
    assert all(s in msg for s in (".jsonl", ".ndjson", ".json", ".parquet", ".csv"))
    assert "decompress" in error(write(tmp_path / "d.jsonl.gz", b"\x1f\x8b"))


def test_where_uses_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "d.jsonl", '{"a": 1}\n')
    assert rows("sub/../sub/d.jsonl")[0].where == "sub/../sub/d.jsonl:1"


def test_errors_raise_at_call_not_iteration(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        read_rows(write(tmp_path / "d.json", "{"))
    rows_iter = read_rows(write(tmp_path / "ok.json", json.dumps([{"a": 1}])))
    assert next(rows_iter).fields == {"a": 1}
