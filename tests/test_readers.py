"""Readers (data/sources.py and friends): every format and compression, wiki and NamuWiki dumps written here,
encodings, and damaged input that must be counted per file and reason, never crash the run or be modified."""
from __future__ import annotations

import bz2
import collections
import csv
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kslm_jax.core import config
from kslm_jax.data import prepare, rawio, sources

KO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"
DOCS = ["대한민국은 민주공화국이다.", '서울, 부산 그리고 "대구"는 도시다.', "한글 문서의 세 번째 줄입니다."]


def _read(path, mode="paragraph", field="text", **kw):
    stats = collections.Counter()
    return list(sources.read_file(Path(path), mode, field, stats, **kw)), stats


def _compress(raw: bytes, comp: str) -> bytes:
    return {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}[comp](raw)


def _digest(paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# ---------------------------------------------------------------------------------------------- formats

def _csv_bytes(delimiter):
    rows = [["id", "text", "label"]] + [[str(i), d, "x"] for i, d in enumerate(DOCS)]
    if delimiter == "\t":  # TSV has no quoting: quotes are text
        return "".join("\t".join(r) + "\n" for r in rows).encode("utf-8")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def _parquet_bytes():
    buf = io.BytesIO()
    table = pa.table({"id": list(range(3)), "text": DOCS, "meta": [{"body": d} for d in DOCS]})
    pq.write_table(table, buf)
    return buf.getvalue()


FORMATS = {  # name → (suffix, bytes, text_field)
    "txt": (".txt", "\n\n".join(DOCS).encode("utf-8"), "text"),
    "jsonl": (".jsonl", "".join(json.dumps({"a": {"b": d}}, ensure_ascii=False) + "\n" for d in DOCS).encode(), "a.b"),
    "json_array": (".json", json.dumps([{"text": d} for d in DOCS], ensure_ascii=False, indent=1).encode(), "text"),
    "json_object": (".json", json.dumps({"data": {"items": [{"text": d} for d in DOCS]}}, ensure_ascii=False,
                                        indent=2).encode(), "data.items.text"),
    "csv": (".csv", _csv_bytes(","), "text"),
    "tsv": (".tsv", _csv_bytes("\t"), "text"),
    "parquet": (".parquet", _parquet_bytes(), "text"),
    "parquet_struct": (".parquet", _parquet_bytes(), "meta.body"),
}


def test_every_format_and_compression(tmp_path):
    written = []
    for (name, (suffix, raw, field)), comp in itertools.product(FORMATS.items(), ("", ".gz", ".bz2", ".xz", ".zst")):
        path = tmp_path / f"{name}{suffix}{comp}"
        path.write_bytes(_compress(raw, comp))
        written.append(path)
        docs, stats = _read(path, field=field)
        assert [d.text for d in docs] == DOCS, (path.name, stats)
        assert not stats, (path.name, stats)
        assert len({d.id for d in docs}) == 3 and all(d.meta["source"] == str(path) for d in docs)
    assert len(written) == 40


def test_missing_column_and_field(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_bytes(_csv_bytes(","))
    pq_path = tmp_path / "a.parquet"
    pq_path.write_bytes(_parquet_bytes())
    for path in (csv_path, pq_path):
        docs, stats = _read(path, field="body")
        assert docs == [] and stats == {"file:missing_column": 1}
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps([{"text": "본문"}, {"other": 1}, 5, {"text": ["목록"]}], ensure_ascii=False))
    docs, stats = _read(json_path)
    assert [d.text for d in docs] == ["본문"] and stats == {"missing_text_field": 3}


def test_tsv_keeps_quotes_and_csv_keeps_newlines(tmp_path):
    tsv = tmp_path / "nli.tsv"
    tsv.write_text('sentence1\tsentence2\n그리고 그가 말했다, "엄마, 저 왔어요.\t둘째 문장\n', encoding="utf-8")
    docs, _ = _read(tsv, field="sentence1")
    assert [d.text for d in docs] == ['그리고 그가 말했다, "엄마, 저 왔어요.']
    multi = tmp_path / "multi.csv"
    multi.write_text('text\n"첫 줄\n둘째 줄, 쉼표"\n짧은 행\n', encoding="utf-8")
    docs, _ = _read(multi)
    assert [d.text for d in docs] == ["첫 줄\n둘째 줄, 쉼표", "짧은 행"]


def test_real_csv_and_tsv_columns():
    docs, stats = _read(KO_DATA / "chatbot_qa.csv", field="A")
    assert len(docs) > 10_000 and docs[0].text == "하루가 또 가네요." and not stats
    docs, stats = _read(KO_DATA / "korsts_dev.tsv", field="sentence2")
    assert docs[0].text == "안전모를 쓴 한 남자가 춤을 추고 있다." and len(docs) > 1000 and not stats


def test_nsmc_reviews_through_the_reader():
    path = KO_DATA / "nsmc_reviews.jsonl.gz"
    stats = collections.Counter()
    docs = list(itertools.islice(sources.read_file(path, "paragraph", "text", stats), 300))
    assert len(docs) == 300 and len({d.id for d in docs}) == 300
    with gzip.open(path, "rt", encoding="utf-8") as f:
        expected = [json.loads(line)["text"] for line in itertools.islice(f, 300)]
    assert [d.text for d in docs] == expected
    assert sum(any("\uac00" <= c <= "\ud7a3" for c in d.text) for d in docs) > 250
    assert not stats


# ---------------------------------------------------------------------------------------------- encodings

def test_encodings(tmp_path):
    text = "안녕하세요. 한국어 문서입니다.\n\n둘째 문단, 똠방각하 뷁."
    want = ["안녕하세요. 한국어 문서입니다.", "둘째 문단, 똠방각하 뷁."]
    cases = {"utf8.txt": text.encode("utf-8"), "bom.txt": b"\xef\xbb\xbf" + text.encode("utf-8"),
             "euckr.txt": text.encode("cp949"), "utf16le.txt": text.encode("utf-16"),
             "utf16be.txt": b"\xfe\xff" + text.encode("utf-16-be")}
    expect_key = {"euckr.txt": "encoding:cp949", "utf16le.txt": "encoding:utf-16", "utf16be.txt": "encoding:utf-16"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        docs, stats = _read(tmp_path / name)
        assert [d.text for d in docs] == want, name
        assert dict(stats) == ({expect_key[name]: 1} if name in expect_key else {}), name
    jsonl = tmp_path / "euckr.jsonl.gz"
    jsonl.write_bytes(gzip.compress((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("cp949")))
    docs, stats = _read(jsonl)
    assert [d.text for d in docs] == [text] and stats == {"encoding:cp949": 1}


def test_mixed_and_undecodable_bytes_are_counted(tmp_path):
    utf8 = "유니코드로 쓴 첫 줄입니다.\n".encode("utf-8")
    # (345 syllables, e.g. 째 = C2 B0, are valid UTF-8 on their own in CP949 and cannot be told apart)
    legacy = "완성형으로 저장한 다음 줄입니다.\n".encode("cp949")
    path = tmp_path / "mixed.txt"
    path.write_bytes(utf8 * 20 + legacy + b"broken \xff\xfe bytes\n" + utf8)
    docs, stats = _read(path, "line")
    texts = [d.text for d in docs]
    assert texts[20] == "완성형으로 저장한 다음 줄입니다."  # read in the other encoding, character by character
    assert texts[21] == "broken \ufffd\ufffd bytes"
    assert stats["undecodable_chars"] == 2 and stats["other_encoding_chars"] == len("완성형으로저장한다음줄입니다")
    assert texts.count("유니코드로 쓴 첫 줄입니다.") == 21


def test_lone_surrogates_in_utf16_are_replaced(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"\xff\xfe" + "앞".encode("utf-16-le") + b"\x00\xd8" + "뒤".encode("utf-16-le"))
    docs, stats = _read(path)
    assert [d.text for d in docs] == ["앞\ufffd뒤"] and stats["undecodable_chars"] == 1
    docs[0].text.encode("utf-8")


# ---------------------------------------------------------------------------------------------- damaged files

def test_empty_binary_and_nul_bytes(tmp_path):
    cases = {"empty.txt": b"", "empty.jsonl.gz": gzip.compress(b""), "empty.xml": b"",
             "random.txt": os.urandom(8192), "zeros.jsonl": b"\x00" * 4096,
             "floats.csv": b"".join(i.to_bytes(8, "little") for i in range(2000))}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        docs, stats = _read(tmp_path / name)
        reason = "file:empty" if name.startswith("empty") else "file:binary"
        assert docs == [] and stats == {reason: 1}, name
    # a few NULs inside text are text (cleaning removes them), not a binary file
    nul = tmp_path / "nul.txt"
    nul.write_bytes("널 문자가\x00 섞인 문서입니다.".encode("utf-8"))
    docs, stats = _read(nul)
    assert [d.text for d in docs] == ["널 문자가\x00 섞인 문서입니다."] and not stats


@pytest.mark.parametrize("comp", [".gz", ".bz2", ".xz", ".zst"])
def test_truncated_compressed_files_keep_what_was_read(tmp_path, comp):
    lines = [json.dumps({"text": f"{i}번째 리뷰: 재미있는 영화였다 {i * 7919 % 10007}"}, ensure_ascii=False)
             for i in range(12_000)]
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    blob = bz2.compress(raw, 1) if comp == ".bz2" else _compress(raw, comp)  # 100k blocks: several of them
    path = tmp_path / f"reviews.jsonl{comp}"
    path.write_bytes(blob[: int(len(blob) * 0.6)])
    before = _digest([path])
    docs, stats = _read(path)
    full = [json.loads(line)["text"] for line in lines]
    assert 0 < len(docs) < len(full)
    assert [d.text for d in docs] == full[: len(docs)]  # whole records only: the cut line is not a document
    assert stats == {"file:truncated": 1}
    assert _digest([path]) == before


def test_corrupt_compressed_and_unreadable(tmp_path):
    blob = bytearray(gzip.compress(("\n".join(DOCS) + "\n").encode("utf-8") * 50))
    blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(bytes(blob))
    _, stats = _read(bad, "line")
    assert stats["file:corrupt"] == 1
    trailing = tmp_path / "trailing.txt.gz"
    trailing.write_bytes(gzip.compress("끝까지 읽힌 문서\n".encode("utf-8")) + b"garbage after the member")
    docs, stats = _read(trailing, "line")
    assert [d.text for d in docs] == ["끝까지 읽힌 문서"] and stats == {"file:corrupt": 1}
    gone = tmp_path / "gone.txt"
    docs, stats = _read(gone)
    assert docs == [] and stats == {"file:unreadable": 1}


def test_long_line_is_read_or_counted_within_bounded_memory(tmp_path):
    """One 20 MB line (the 200 MB case, scaled down): read in full under the default bound with memory a small
    multiple of the line, and skipped and counted under a lower bound without ever holding it."""
    big = "가나다라마바사 " * 850_000  # 6.8M characters, 20.4 MB of UTF-8
    path = tmp_path / "long.txt"
    path.write_bytes(f"첫 줄\n{big}\n끝 줄\n".encode("utf-8"))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        docs, stats = _read(path, "line")
        _, peak_read = tracemalloc.get_traced_memory()
        assert [len(d.text) for d in docs] == [3, len(big), 3] and docs[1].text == big and not stats
        del docs
        tracemalloc.reset_peak()
        docs, stats = _read(path, "line", max_chars=1_000_000)
        _, peak_skip = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["첫 줄", "끝 줄"] and stats == {"record_too_long": 1}
    assert peak_read < 3 * size, peak_read
    assert peak_skip < 16 * rawio.CHUNK, peak_skip  # the chunk, its decoded text and the bounded line buffer


def test_malformed_json_lines_and_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "좋은 줄"}\n{"text": 잘못된\n\n[1, 2]\n{"text": "또 좋은 줄"}\n', encoding="utf-8")
    docs, stats = _read(path)
    assert [d.text for d in docs] == ["좋은 줄", "또 좋은 줄"] and [d.id.rsplit(":", 1)[1] for d in docs] == ["1", "5"]
    assert stats == {"bad_json_line": 1, "missing_text_field": 1}
    dump = tmp_path / "namuwiki_bad.json"
    dump.write_text(json.dumps({"namespace": "0", "title": "제목", "text": "배열이 아니다"}, ensure_ascii=False),
                    encoding="utf-8")
    docs, stats = _read(dump)
    assert docs == [] and stats == {"file:not_an_array": 1}


# ---------------------------------------------------------------------------------------------- prepare

def test_prepare_reports_every_file_and_reason(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = "\n\n".join(f"{i}번째 문단은 한국어로 쓴 충분히 긴 문장입니다." for i in range(20))
    (src / "good.txt").write_text(good, encoding="utf-8")
    (src / "legacy.txt").write_bytes("완성형 인코딩으로 저장한 오래된 문서입니다.".encode("cp949"))
    (src / "empty.txt").write_bytes(b"")
    (src / "binary.txt").write_bytes(bytes(range(256)) * 64)
    blob = gzip.compress(good.encode("utf-8"))
    (src / "cut.txt.gz").write_bytes(blob[: len(blob) // 2])
    (src / "lines.jsonl").write_text('{"text": "제이슨 줄 하나로 된 한국어 문서입니다."}\n{깨진 줄\n', encoding="utf-8")
    (src / "namuwiki_x.json").write_text('{"title": "배열 아님"}', encoding="utf-8")
    files = sorted(src.iterdir())
    before = _digest(files)
    cfg = config.base_config()
    with cfg.unlocked():
        cfg.data.sources = f"{src}/*"
        cfg.data.val_fraction = 0.0
    report = prepare.prepare(cfg, tmp_path / "clean")
    assert _digest(files) == before
    per_file = report["read_per_file"]
    assert set(per_file) == {str(p) for p in files}
    assert per_file[str(src / "good.txt")] == {"docs": 20}
    assert per_file[str(src / "legacy.txt")] == {"docs": 1, "encoding:cp949": 1}
    assert per_file[str(src / "empty.txt")] == {"docs": 0, "file:empty": 1}
    assert per_file[str(src / "binary.txt")] == {"docs": 0, "file:binary": 1}
    assert per_file[str(src / "cut.txt.gz")]["file:truncated"] == 1
    assert per_file[str(src / "lines.jsonl")] == {"docs": 1, "bad_json_line": 1}
    assert per_file[str(src / "namuwiki_x.json")] == {"docs": 0, "file:not_an_array": 1}
    assert report["docs_in"] == sum(v["docs"] for v in per_file.values())
    for key in ("file:empty", "file:binary", "file:truncated", "file:not_an_array", "bad_json_line"):
        assert report["cleaning"][key] == 1
