"""Property tests (hypothesis) for everything that reads user input: cleaning, decoding, file readers,
`prepare` and config overrides. None of them may raise anything but KslmError, whatever the bytes.

Example counts are small so the file runs in well under a minute on 2 CPU cores; raise them for a long
soak with e.g. `KSLM_FUZZ_EXAMPLES=5000 python -m pytest tests/faults/test_fuzz.py`.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import re
import string
import tempfile
import unicodedata
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kslm_jax.core import config, config_schema
from kslm_jax.core.errors import KslmError
from kslm_jax.data import clean, prepare, rawio, sources


def examples(default: int) -> int:
    """`KSLM_FUZZ_EXAMPLES=N` raises every property's example count to at least N."""
    env = os.environ.get("KSLM_FUZZ_EXAMPLES", "").strip()
    return max(default, int(env)) if env else default


# database=None: no .hypothesis/ folder in the checkout; a failure prints its example (and a blob to replay).
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])


def fuzz(default: int):
    return settings(FUZZ, max_examples=examples(default))

# ---------------------------------------------------------------------------------------------------------
# text strategies

SYLLABLES = st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
JAMO = st.one_of(st.characters(min_codepoint=0x1100, max_codepoint=0x11FF),       # conjoining
                 st.characters(min_codepoint=0x3131, max_codepoint=0x318E))       # compatibility (ㅋ)
CONTROLS = st.characters(max_codepoint=0x9F, categories=["Cc"])
SPECIAL = st.sampled_from(list("\u200b\ufeff\u2028\u2029\x85\r\n\t \u3000\u00a0\u0301\u0316\u1161\u11a8"))
FRAGMENTS = st.sampled_from([
    "<b>", "</p>", "<br/>", "<a href='http://x.kr/a?b=1'>", "<!--", "-->", "<!-- 주석 -->", "<script>", "<",
    ">", "<개정 2010.1.1>", "&amp;", "&lt;b&gt;", "&amp;lt;", "&#4352;", "&#x1161;", "&#44032;", "&#0;", "&#xD800;",
    "&#128;", "&#x85;", "&nbsp;", "&#x200b;", "&", "http://", "https://example.com/path?q=1", "www.", "www.naver.com",
    "@", "user@example.com", "a.b@c.co.kr", "메일은 x@y.kr로", "\r\n", "\n\n\n", "e\u0301", "\u1100\u1161\u11a8",
])
SENTENCES = [
    "대한민국은 민주공화국이다.", "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "이 법은 공포한 날부터 시행한다.", "모든 국민은 법 앞에 평등하다.", "국가는 전통문화의 계승·발전과 민족문화의 창달에 노력하여야 한다.",
    "ㅋㅋㅋ 진짜 웃기다", "서울특별시 종로구 세종대로 209", "2024년 3월 1일 오전 10시에 회의를 연다.",
]


def _run(piece, most: int):
    """A piece repeated up to `most` times: long runs are where regexes go quadratic."""
    return st.tuples(piece, st.integers(1, most)).map(lambda t: t[0] * t[1])


PIECE = st.one_of(
    st.text(max_size=20), st.text(SYLLABLES, max_size=20), st.text(JAMO, max_size=10), CONTROLS, SPECIAL,
    FRAGMENTS, st.sampled_from(SENTENCES),
    _run(st.one_of(SYLLABLES, SPECIAL, CONTROLS, st.sampled_from("a.-_@w<>&#/:")), 20_000),
    # "<!--" runs stay short: many unclosed comment openers are quadratic (test_comment_openers_linear below).
    _run(FRAGMENTS, 300),
)
TEXT = st.lists(PIECE, max_size=12).map("".join)


def _data_cfg(replace_urls=True, replace_emails=True):
    cfg = config.base_config()
    with cfg.unlocked():
        cfg.data.url_action = "replace" if replace_urls else "keep"
        cfg.data.email_action = "replace" if replace_emails else "keep"
    return cfg.data


DATA_CFGS = {(u, e): _data_cfg(u, e) for u in (True, False) for e in (True, False)}


def check_clean_output(out) -> None:
    assert isinstance(out, str)
    assert unicodedata.is_normalized("NFC", out), ascii(out[:200])
    out.encode("utf-8")  # no lone surrogates
    controls = sorted({c for c in out if unicodedata.category(c) == "Cc" and c != "\n"})
    assert not controls, controls
    assert "\u200b" not in out and "\ufeff" not in out
    assert out == out.strip()
    assert "\n\n\n" not in out


# ---------------------------------------------------------------------------------------------------------
# clean.clean_text


@fuzz(300)
@given(text=TEXT, urls=st.booleans(), emails=st.booleans())
@example(text="\u1100\u200b\u1161", urls=True, emails=True)    # jamo split by a removed zero-width space
@example(text="e\x00\u0301", urls=True, emails=True)           # base and mark split by a removed NUL
@example(text="a\x85b\x9fc", urls=True, emails=True)           # C1 controls
@example(text="&#4352;&#x1161; &amp;lt;b&amp;gt;", urls=True, emails=True)
def test_clean_text_invariants(text, urls, emails):
    cfg = DATA_CFGS[(urls, emails)]
    stats = collections.Counter()
    out = clean.clean_text(text, cfg, stats)
    check_clean_output(out)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
    assert clean.rejection(out, cfg) in (None,) + clean.FILTERS
    assert 0.0 <= clean.hangul_ratio(out) <= 1.0
    # Cleaning is NOT idempotent (html.unescape reveals entities and tags for a second pass, removing a
    # control character can join `www.` or an address); only the invariants must hold again.
    check_clean_output(clean.clean_text(out, cfg, collections.Counter()))


def test_clean_text_long_runs_are_linear():
    """Long runs of address characters with no @ (base64, hex) were rescanned from every position."""
    import time
    cfg = DATA_CFGS[(True, True)]
    for text in ("a" * 300_000, "www." * 75_000, "a.b-c_d" * 40_000, "<" + "a" * 300_000, "가" * 300_000):
        t0 = time.perf_counter()
        clean.clean_text(text, cfg, collections.Counter())
        assert time.perf_counter() - t0 < 2.0, text[:10]


def test_comment_openers_linear():
    import time
    t0 = time.perf_counter()
    clean.clean_text("<!--" * 3_000, DATA_CFGS[(True, True)], collections.Counter())  # about 0.5 s, linear: 1 ms
    assert time.perf_counter() - t0 < 0.05


# ---------------------------------------------------------------------------------------------------------
# sources.decode_bytes


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _cp949_ok(text: str) -> bool:
    try:
        text.encode("cp949")
        return True
    except UnicodeEncodeError:
        return False


@fuzz(300)
@given(raw=st.one_of(st.binary(max_size=4096), st.text().map(lambda t: t.encode("utf-8")),
                     st.text(SYLLABLES).map(lambda t: t.encode("cp949"))))
@example(raw=b"\xef\xbb\xbf")
@example(raw=b"\xff\xfe\x00\x00")
def test_decode_bytes_total(raw):
    stats = collections.Counter()
    text = sources.decode_bytes(raw, stats)
    assert isinstance(text, str)
    text.encode("utf-8")
    assert set(stats) <= {"encoding:cp949", "encoding:utf-16", "undecodable_chars", "other_encoding_chars"}


@fuzz(200)
@given(text=st.text(), bom=st.booleans())
def test_decode_bytes_utf8_round_trip(text, bom):
    assume(bom or not text.startswith("\ufeff"))  # a leading U+FEFF is a BOM and is dropped
    stats = collections.Counter()
    assert sources.decode_bytes(b"\xef\xbb\xbf" * bom + text.encode("utf-8"), stats) == text
    assert not stats


# CP949 has every modern syllable and the compatibility jamo, not the conjoining jamo (U+1100...).
KOREAN_CP949 = st.text(st.one_of(SYLLABLES, st.characters(min_codepoint=0x3131, max_codepoint=0x318E), st.characters(),
                                 st.sampled_from(" .,!?()0123456789\nabcXYZ")),
                       min_size=1, max_size=200).filter(_cp949_ok)


@fuzz(200)
@given(text=KOREAN_CP949)
@example(text="대한민국은 민주공화국이다.")
def test_decode_bytes_cp949_round_trip(text):
    raw = text.encode("cp949")
    # 345 of the 11,172 syllables are valid UTF-8 on their own in CP949 (징 = C2 A1 = "¡"): such short byte
    # strings read as UTF-8 by design (UTF-8 is tried first), so only bytes that are not UTF-8 must round-trip.
    assume(not _is_utf8(raw))
    stats = collections.Counter()
    assert sources.decode_bytes(raw, stats) == text
    assert stats == {"encoding:cp949": 1}


# ---------------------------------------------------------------------------------------------------------
# sources.read_file

MODES = ("file", "paragraph", "line")
_JSONL_LINES = re.compile(r"\r\n?|\n")  # what a JSON-lines reader must split on; never U+2028, U+0085, \x0c


def _read(path: Path, mode: str, field: str = "text"):
    stats = collections.Counter()
    docs = list(sources.read_file(path, mode, field, stats))
    return docs, stats


@fuzz(150)
@given(raw=st.one_of(st.binary(max_size=2048), TEXT.map(lambda t: t.encode("utf-8"))),
       suffix=st.sampled_from([".txt", ".jsonl", ".json", ".jsonl.gz", ".txt.gz"]), mode=st.sampled_from(MODES))
def test_read_file_arbitrary_bytes(raw, suffix, mode):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"in{suffix}"
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
        docs, stats = _read(path, mode)
    text = sources.decode_bytes(raw, collections.Counter())
    assert all(isinstance(doc.text, str) for doc in docs)
    assert len({doc.id for doc in docs}) == len(docs)
    if stats["file:binary"] or stats["file:empty"]:  # skipped whole, and only when it is not text
        assert not docs and (not raw or rawio.looks_binary(raw[:rawio.SAMPLE]))
        return
    if ".json" not in suffix:
        assert all(doc.text.strip() for doc in docs)
    if suffix == ".json":  # an array, an object or JSON lines, told apart by the first line
        for doc in docs:
            doc.text.encode("utf-8")
    elif ".jsonl" in suffix:
        nonblank = sum(1 for line in _JSONL_LINES.split(text) if line.strip())
        assert len(docs) + stats["bad_json_line"] + stats["missing_text_field"] == nonblank
        for doc in docs:
            doc.text.encode("utf-8")
    elif mode == "file":
        assert len(docs) <= 1
    elif mode == "line":
        assert [doc.text for doc in docs] == [line for line in text.splitlines() if line.strip()]
    else:
        assert all(doc.text in text.replace("\r\n", "\n") for doc in docs)


@fuzz(100)
@given(raw=st.binary(max_size=2048), mode=st.sampled_from(MODES))
def test_read_file_not_gzip(raw, mode):
    """Bytes that are no gzip stream, in a .gz file: counted as corrupt or truncated, the file skipped."""
    try:
        gzip.decompress(raw)
        valid = True
    except (OSError, EOFError, zlib.error):
        valid = False
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "notgzip.jsonl.gz"
        path.write_bytes(raw)
        docs, stats = _read(path, mode)
    if not valid:
        assert {k for k in stats if k.startswith("file:")} in ({"file:corrupt"}, {"file:truncated"})
        assert stats["file:corrupt"] + stats["file:truncated"] == 1


@fuzz(150)
@given(payload=st.one_of(st.binary(min_size=1, max_size=2048), TEXT.map(lambda t: t.encode("utf-8"))),
       cut=st.floats(0.0, 1.0, exclude_max=True), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                           st.integers(0, 255)), max_size=4),
       suffix=st.sampled_from([".jsonl.gz", ".txt.gz"]), mode=st.sampled_from(MODES))
def test_read_file_truncated_or_corrupt_gzip(payload, cut, flips, suffix, mode):
    blob = gzip.compress(payload)
    truncated = blob[:max(1, int(cut * len(blob)))]
    corrupt = bytearray(blob)
    for where, value in flips:
        corrupt[int(where * len(corrupt))] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"broken{suffix}"
        path.write_bytes(truncated)
        _, stats = _read(path, mode)  # every proper prefix is counted, and the run goes on
        # (a binary start is found, and counted, before the cut is reached)
        assert stats["file:truncated"] + stats["file:corrupt"] + stats["file:binary"] == 1
        path.write_bytes(bytes(corrupt))
        # flipped bytes may survive (header flags, mtime) or decode to other text: at most one file reason
        _, stats = _read(path, mode)
        assert sum(v for k, v in stats.items() if k.startswith("file:")) <= 1


# Lone surrogates cannot be written as UTF-8 at all, so they are not inputs a file can hold.
NO_NEWLINE = st.characters(exclude_characters="\r\n", exclude_categories=("Cs",))


# JSON lines with a known fate: ("doc", text) | ("bad", None) | ("counted", None: bad or missing) | ("missing",) | blank
def _doc_line(text, ascii_only, key="text"):
    return json.dumps({key: text, "id": 1}, ensure_ascii=ascii_only), ("doc", text)


JSON_LINE = st.one_of(
    st.builds(_doc_line, st.text(max_size=40), st.booleans()),
    st.builds(_doc_line, st.sampled_from(SENTENCES + ["a\u2028b", "x\x85y", "p\u2029q", "f\x0cg\x1ch", "탭\t끝"]),
              st.booleans()),
    st.sampled_from([  # wrong shapes: counted as missing_text_field
        '{"text": 5}', '{"text": null}', '{"text": ["a"]}', '{"text": {"text": "a"}}', '{"other": "x"}', "[1, 2]",
        '"just a string"', "5", "null", "true", '{"text": NaN}', '{"text": 1e999}', "{}", '{"meta": {"text": "a"}}',
    ]).map(lambda s: (s, ("missing", None))),
    st.one_of(st.text(NO_NEWLINE, max_size=30).map(lambda t: "{," + t), st.sampled_from([
        "{", "}", '{"text": "unterminated', "{'text': 'single quotes'}", '{"text": "a"} trailing', "nul\x00l",
        '{"text": "raw\x01control"}', '{"text": "a",}', "[[[",
    ])).map(lambda s: (s, ("bad", None))),
    st.sampled_from(["", " ", "\t", "\u3000", "  \t "]).map(lambda s: (s, ("blank", None))),
    # escapes of lone surrogates decode to a str that cannot be encoded: read as U+FFFD
    st.sampled_from([('{"text": "a\\ud800b"}', "a\ufffdb"), ('{"text": "\\udfff"}', "\ufffd"),
                     ('{"text": "\\ud83d\\ude00 ok"}', "\U0001F600 ok")]).map(lambda t: (t[0], ("doc", t[1]))),
    # past the interpreter's limits: RecursionError or ValueError inside json, counted either way
    # a U+FEFF that opens the file is a BOM (then {} is a record without text), anywhere else it is bad JSON
    st.sampled_from(["[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, '{"text": ' + "7" * 5000 + "}",
                     "\ufeff{}"])
    .map(lambda s: (s, ("counted", None))),
)


@fuzz(150)
@given(lines=st.lists(JSON_LINE, max_size=25), seps=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=25, max_size=25),
       bom=st.booleans(), gz=st.booleans(), final_newline=st.booleans())
def test_read_file_jsonl_accounts_for_every_line(lines, seps, bom, gz, final_newline):
    body = "".join(line + sep for (line, _), sep in zip(lines, seps))
    if not final_newline and body:
        body = body.rstrip("\r\n")
    raw = b"\xef\xbb\xbf" * bom + body.encode("utf-8")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("data.jsonl.gz" if gz else "data.jsonl")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        docs, stats = _read(path, "paragraph")
    if stats["file:binary"]:  # lines of NULs and other controls: skipped whole, and only then
        assert not docs and rawio.looks_binary(raw[:rawio.SAMPLE])
        return
    fates = [fate for _, fate in lines]
    assert [doc.text for doc in docs] == [text for kind, text in fates if kind == "doc"]
    kinds = collections.Counter(kind for kind, _ in fates)
    assert stats["missing_text_field"] >= kinds["missing"] and stats["bad_json_line"] >= kinds["bad"]
    assert stats["missing_text_field"] + stats["bad_json_line"] == kinds["missing"] + kinds["bad"] + kinds["counted"]
    # ids carry the physical line number
    linenos = [i for i, (kind, _) in enumerate(fates, 1) if kind == "doc"]
    assert [doc.id for doc in docs] == [f"{path}:{n}" for n in linenos]
    for doc in docs:
        doc.text.encode("utf-8")


def test_read_file_deep_nesting_is_a_bad_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"text": "살아남은 줄"}, ensure_ascii=False)
    path.write_text("\n".join([good, "[" * 5000 + "]" * 5000, '{"text":' * 200_000, good, '{"a":' * 5000 + "1" + "}" * 5000]),
                    encoding="utf-8")
    docs, stats = _read(path, "paragraph")
    assert [d.text for d in docs] == ["살아남은 줄", "살아남은 줄"]
    assert stats["bad_json_line"] == 3


def test_read_file_jsonl_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw; they do not end a JSON line."""
    texts = ["첫째\u2028둘째", "a\x85b", "p\u2029q"]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    docs, stats = _read(path, "paragraph")
    assert [d.text for d in docs] == texts and not stats


# ---------------------------------------------------------------------------------------------------------
# prepare.prepare

KOREAN_DOC = st.one_of(
    st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=4).map(" ".join),
    st.text(st.one_of(SYLLABLES, st.just(" ")), min_size=5, max_size=80),
    st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=3).map(lambda s: "<p>" + " ".join(s) + "</p> www.x.kr"),
)
ANY_DOC = st.one_of(KOREAN_DOC, KOREAN_DOC, TEXT, st.sampled_from(["short", "짧다", "", "   ", "English only text here."]))
FILE_SPEC = st.tuples(st.sampled_from([".txt", ".jsonl", ".jsonl.gz", ".txt.gz"]), st.lists(ANY_DOC, max_size=8),
                      st.lists(st.sampled_from(["{bad json", '{"x": 1}', "[]"]), max_size=2), st.sampled_from(["utf-8", "cp949"]))


def _write_corpus(folder: Path, specs) -> list[Path]:
    files = []
    for i, (suffix, docs, junk, encoding) in enumerate(specs):
        if ".jsonl" in suffix:
            lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs] + junk
            body = "\n".join(lines) + "\n"
        else:
            body = "\n\n".join(docs)
        raw = body.encode("utf-8")
        if encoding == "cp949" and _cp949_ok(body):
            raw = body.encode("cp949")
        path = folder / f"src{i}{suffix}"
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
        files.append(path)
    return files


def _hashes(files):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _prepare_cfg(files, text_mode="paragraph", val_fraction=0.1, shard_docs=100_000):
    cfg = config.base_config()
    with cfg.unlocked():
        cfg.data.sources = ",".join(str(p) for p in files)
        cfg.data.text_mode, cfg.data.val_fraction, cfg.data.shard_docs = text_mode, val_fraction, shard_docs
    config.validate(cfg)
    return cfg


def _leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name != name]


@fuzz(40)
@given(specs=st.lists(FILE_SPEC, min_size=1, max_size=4), mode=st.sampled_from(MODES),
       val_fraction=st.sampled_from([0.0, 0.1, 0.5, 0.9]), shard_docs=st.integers(1, 5))
def test_prepare_accounts_for_every_document(specs, mode, val_fraction, shard_docs):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "in").mkdir()
        files = _write_corpus(d / "in", specs)
        before = _hashes(files)
        cfg = _prepare_cfg(files, mode, val_fraction, shard_docs)
        out = d / "wd" / "data" / "clean"
        n_read = len(list(sources.read_all(files, mode, "text", collections.Counter())))
        try:
            report = prepare.prepare(cfg, out)
        except KslmError as e:
            assert "no documents left" in str(e) or "no documents read" in str(e)  # read: text_field absent
            assert not out.exists() and not _leftovers(out.parent, out.name)
            assert _hashes(files) == before
            return
        assert _hashes(files) == before
        assert not _leftovers(out.parent, out.name)  # no .clean.partial-* folder
        assert report["docs_in"] == n_read
        assert sum(report["docs_out"].values()) + sum(report["dropped"].values()) == report["docs_in"]
        assert report["files"] == len(files)
        assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
        seen = set()
        for split in ("train", "val"):
            shards = sorted(out.glob(f"{split}-*.jsonl"))
            n = chars = 0
            for shard in shards:
                lines = shard.read_text(encoding="utf-8").split("\n")
                assert lines[-1] == ""
                assert 1 <= len(lines) - 1 <= shard_docs
                for line in lines[:-1]:
                    rec = json.loads(line)
                    assert set(rec) == {"id", "text", "source"}
                    text = rec["text"]
                    check_clean_output(text)
                    assert clean.rejection(text, cfg.data) is None
                    assert prepare.split_of(text, val_fraction) == split
                    assert text not in seen
                    seen.add(text)
                    n += 1
                    chars += len(text)
            assert n == report["docs_out"][split] and chars == report["chars_out"][split]
            assert list(prepare.read_clean(out, split, required=False)) == [
                json.loads(x)["text"] for s in shards for x in s.read_text(encoding="utf-8").split("\n")[:-1]]
        assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".jsonl")) == ["report.json"]
        first = {p.name: p.read_bytes() for p in out.iterdir()}
        assert prepare.prepare(cfg, out) == report  # deterministic, and replaces the previous output
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_prepare_lone_surrogate_escape(tmp_path):
    """`"\\ud800"` in a JSON line decodes to a str that UTF-8 cannot encode; prepare crashed hashing it."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "대한민국은 민주공화국이다. 모든 국민은 \\ud800 법 앞에 평등하다."}\n', encoding="utf-8")
    out = tmp_path / "clean"
    report = prepare.prepare(_prepare_cfg([src], val_fraction=0.0), out)
    assert report["docs_out"]["train"] == 1 and report["cleaning"]["undecodable_chars"] == 1
    assert list(prepare.read_clean(out, "train")) == ["대한민국은 민주공화국이다. 모든 국민은 \ufffd 법 앞에 평등하다."]


GARBAGE_TEXT = st.one_of(
    st.text(string.printable.replace("&", ""), max_size=200),                # no Hangul (and no &#44032;)
    st.text(SYLLABLES, max_size=5),                                         # Hangul, but too short
    st.sampled_from(["<b></b>", "http://example.com/only", "x@y.kr", "\x00\x01\x02", "   "]),
)
GARBAGE_FILE = st.one_of(
    # in .txt short Hangul pieces could join into one long document (text_mode=file): no Hangul there
    st.tuples(st.just(".txt"), st.lists(GARBAGE_TEXT.filter(lambda t: not any(map(clean.is_hangul, t))),
                                        max_size=5).map("\n\n".join)),
    st.tuples(st.sampled_from([".jsonl", ".jsonl.gz"]), st.lists(st.one_of(
        GARBAGE_TEXT.map(lambda t: json.dumps({"text": t}, ensure_ascii=False)),
        st.sampled_from(["{bad", '{"text": 3}', "[]", '{"body": "대한민국은 민주공화국이다."}']),
        st.text(NO_NEWLINE, max_size=30).map(lambda t: "{," + t)), max_size=6).map("\n".join)),
)


@fuzz(40)
@given(garbage=st.lists(GARBAGE_FILE, min_size=1, max_size=3), keep_old=st.booleans())
def test_prepare_all_garbage_fails_cleanly(garbage, keep_old):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "in").mkdir()
        files = []
        for i, (suffix, body) in enumerate(garbage):
            path = d / "in" / f"junk{i}{suffix}"
            raw = body.encode("utf-8")
            path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
            files.append(path)
        before = _hashes(files)
        out = d / "wd" / "data" / "clean"
        old = None
        if keep_old:  # a previous good run's output must survive a failed run untouched
            good = d / "good.txt"
            good.write_text("\n\n".join(SENTENCES), encoding="utf-8")
            prepare.prepare(_prepare_cfg([good]), out)
            old = {p.name: p.read_bytes() for p in out.iterdir()}
        for mode in MODES:
            with pytest.raises(KslmError, match="no documents (left|read)"):
                prepare.prepare(_prepare_cfg(files, mode), out)
            assert not _leftovers(out.parent, out.name)
            if old is None:
                assert not out.exists()
            else:
                assert {p.name: p.read_bytes() for p in out.iterdir()} == old
        assert _hashes(files) == before


# ---------------------------------------------------------------------------------------------------------
# config

_BASE = config.base_config()
REAL_KEYS = sorted(config.flat(config.to_dict(_BASE)))
SECTIONS = sorted(_BASE.keys())
MARKER = Path(tempfile.gettempdir()) / f"kslm-pwned-{uuid.uuid4().hex}"
PAYLOADS = [
    f"__import__('os').system('touch {MARKER}')",
    f"__import__('pathlib').Path('{MARKER}').touch()",
    f"open('{MARKER}', 'w').write('x')",
    f"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{MARKER}'])",
    f"$(touch {MARKER})", f"`touch {MARKER}`", f"1; import os; os.system('touch {MARKER}')",
    f"lambda: open('{MARKER}', 'w')", "{'a': 1}", "[1, 2]", "(1,)", "None", "b'x'", "1e999", "nan", "-inf", "0x10", "1_000",
    "٣", "１２", "9" * 5000, "", " 7 ", "True", "yes", "0", "-1", "\x00", "a=b", "\u2028",
]
KEYS = st.one_of(
    st.sampled_from(REAL_KEYS), st.sampled_from(SECTIONS), st.text(max_size=30),
    st.builds(lambda k, s: k + s, st.sampled_from(REAL_KEYS), st.text(max_size=5)),
    st.lists(st.sampled_from(SECTIONS + ["", "x", "__class__", "_fields", "lock", "d_model"]), max_size=4).map(".".join),
    st.sampled_from(["__class__", "model.__class__", "model.__dict__", "model._fields", "lock", "model.lock",
                     "model.unlocked", "to_json", "", ".", "..", "model.", ".d_model", "model..d_model", "model.d_model.x"]),
)
VALUES = st.one_of(st.text(max_size=40), st.sampled_from(PAYLOADS), st.integers().map(str),
                   st.integers(-2, 3).map(str), st.floats(allow_nan=True).map(repr), st.booleans().map(str))


@fuzz(400)
@given(items=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4), sep=st.sampled_from(["=", "", "=="]))
@example(items=[("model.n_kv_heads", "0")], sep="=")   # were ZeroDivisionError in validate()
@example(items=[("model.n_heads", "0")], sep="=")
@example(items=[("train.grad_accum", "0")], sep="=")
def test_config_overrides_only_kslm_errors(items, sep):
    overrides = [f"{k}{sep}{v}" for k, v in items]
    cfg = config.base_config()
    for item in overrides:
        key = item.partition("=")[0]
        try:
            config.apply_override(cfg, item)
        except KslmError:
            continue
        # it was accepted: a real leaf, still of the schema's type
        assert key in REAL_KEYS
        assert config_schema._same_type(config_schema._get(cfg, key), config_schema._get(_BASE, key))
    try:
        config.validate(cfg)
    except KslmError:
        pass
    try:
        config.load(None, overrides)
    except KslmError:
        pass
    assert not MARKER.exists()


# Fixed ids: the payloads hold a random marker path, and xdist workers must collect the same test names.
@pytest.mark.parametrize("payload", PAYLOADS[:8], ids=[f"payload{i}" for i in range(8)])
def test_config_values_are_never_code(payload):
    for key in REAL_KEYS:
        cfg = config.base_config()
        try:
            config.apply_override(cfg, f"{key}={payload}")
        except KslmError:
            continue
        value = config_schema._get(cfg, key)
        # only a string field takes it, and then as the literal text
        assert isinstance(value, str) and value == payload, (key, value)
    assert not MARKER.exists()


@fuzz(50)
@given(name=st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1, max_size=30))
def test_config_load_missing_recipe(name):
    with tempfile.TemporaryDirectory() as d:
        for path in (str(Path(d) / name), str(Path(d) / f"{name}.py")):
            with pytest.raises(KslmError, match="not found"):
                config.load(path)


def test_config_load_missing_bare_name():
    for name in ("no_such_recipe", "no_such_recipe.py", "configs/no_such_recipe.py", "/nonexistent/x.py", ""):
        with pytest.raises(KslmError):
            config.load(name)


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(SECTIONS + REAL_KEYS)), inner, max_size=4)),
    max_leaves=20)
CONFIG_JSON = st.one_of(
    JSON_VALUE,
    st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from([k.split(".")[1] for k in REAL_KEYS] + ["x"]),
                                                               JSON_VALUE, max_size=4), max_size=4),
)


@fuzz(150)
@given(doc=st.one_of(CONFIG_JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                     st.sampled_from([b"[" * 5000, b"\xff\xfe{}", b""])))
def test_read_workdir_config_only_kslm_errors(doc):
    """A damaged WORKDIR/config.json: a one-line error naming the key or the file, never a traceback."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_bytes(doc)
        try:
            cfg = config.read_workdir_config(d)
        except KslmError:
            return
        config.validate(cfg)
