"""Record files (fine-tuning examples, task items) through the readers of data.sources: every format and
compression gives the same records, CP949 is read, and every bad input stops with one error that names the file
and the line or record and says what to do."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kslm_jax.core.errors import KslmError
from kslm_jax.data import records

KO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"
FIELDS = ["score", "sentence1", "sentence2"]


def _korsts(n=40):
    """Real KorSTS pairs, as the TSV reader gives them (quotes are text in TSV)."""
    rows = [rec for _, rec in records.read(KO_DATA / "korsts_dev.tsv")][:n]
    assert len(rows) == n and all(r["sentence1"] for r in rows)
    return [{k: r[k] for k in FIELDS} for r in rows]


def _csv_text(rows, delimiter=","):
    out = io.StringIO()
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    w = csv.DictWriter(out, FIELDS, delimiter=delimiter, quoting=quoting, escapechar=None, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def _write_all(tmp_path, rows):
    """The same records in every format, some compressed; name -> path."""
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    files = {
        "a.jsonl": jsonl, "a.jsonl.gz": gzip.compress(jsonl), "a.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl),
        "a.json": json.dumps(rows, ensure_ascii=False).encode(),
        "b.json": json.dumps({"data": rows}, ensure_ascii=False).encode(),
        "a.csv": _csv_text(rows).encode("utf-8-sig"),  # a spreadsheet's byte-order mark
        "a.csv.bz2": bz2.compress(_csv_text(rows).encode()),
        "a.tsv": _csv_text(rows, "\t").encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    return {name: tmp_path / name for name in [*files, "a.parquet"]}


def test_every_format_gives_the_same_records(tmp_path):
    rows = _korsts()
    for name, path in _write_all(tmp_path, rows).items():
        got = list(records.read(path))
        assert [r for _, r in got] == rows, name
        unit = "record" if name.endswith((".json", ".parquet")) else "line"
        first = 1 if unit == "record" else (2 if ".csv" in name or ".tsv" in name else 1)
        assert got[0][0] == f"{path} {unit} {first}", name


def test_cp949_csv_is_read(tmp_path):
    """Korean spreadsheets are often saved as CP949; the shared readers detect it (the old reader refused it)."""
    with open(KO_DATA / "chatbot_qa.csv", encoding="utf-8") as f:
        text = "".join(f.readline() for _ in range(30))
    p = tmp_path / "chat.csv"
    p.write_bytes(text.encode("cp949"))
    got = [r for _, r in records.read(p)]
    assert got == list(csv.DictReader(io.StringIO(text))) and len(got) == 29


def test_nfc_and_empty_file(tmp_path):
    p = tmp_path / "nfd.jsonl"
    p.write_text(json.dumps({"text": "\u1100\u1161"}) + "\n", encoding="utf-8")  # 가 as decomposed jamo
    assert [r for _, r in records.read(p)] == [{"text": "가"}]
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(records.read(tmp_path / "empty.jsonl")) == []


def _error(path) -> str:
    with pytest.raises(KslmError) as e:
        list(records.read(path))
    return str(e.value)


def test_bad_input_names_file_record_and_remedy(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    assert _error(p).startswith(f"{p} line 3: not valid JSON") and "fix or remove that line" in _error(p)
    p = tmp_path / "list.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    assert _error(p) == f"{p} line 2: a record must be a JSON object, not list"
    p = tmp_path / "wide.csv"
    p.write_text("a,b\n1,2\n1,2,3\n", encoding="utf-8")
    assert _error(p).startswith(f"{p} line 3: more columns than the header (a, b)")
    p = tmp_path / "latin.jsonl"
    p.write_bytes('{"a": "가"}\n'.encode() + b'{"a": "\xff\xfe\xfd"}\n')
    assert _error(p) == (f"{p}: 3 bytes that are neither UTF-8 nor CP949 (nor UTF-16 with a byte-order mark); "
                         "convert the file to UTF-8")
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"a": 1}\n' * 5000)[:-40])
    assert _error(p).startswith(f"{p}: cannot be read (truncated") and "fetch or write it again" in _error(p)
    p = tmp_path / "one.json"
    p.write_text('{\n  "a": 1,\n  "b": 2\n}\n', encoding="utf-8")  # one pretty-printed object, not a list
    assert "must hold a list of records" in _error(p)
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1" + b"\0" * 64)
    assert _error(p).startswith(f"{p}: cannot be read (corrupt")
    assert "unknown record format" in _error(tmp_path / "x.docx")
    assert _error(tmp_path / "absent.jsonl") == f"{tmp_path / 'absent.jsonl'}: file not found"
