"""Data stages: cleaning, readers, prepare, tokenizer, token shards and the grain pipeline (no training)."""
import collections
import copy
import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_module

from kslm_jax.core.config import base_config
from kslm_jax.core.errors import KslmError
from kslm_jax.data import clean, pipeline, prepare, shards, sources
from kslm_jax.data import tokenizer as tok_lib


def _dcfg(**changes):
    d = base_config().data
    for k, v in changes.items():
        d[k] = v
    return d


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------- clean


def test_clean_nfc_composes_decomposed_jamo():
    stats = collections.Counter()
    decomposed = "\u1112\u1161\u11ab\u1100\u116e\u11a8\uc5b4"  # ᄒ ᅡ ᆫ ᄀ ᅮ ᆨ 어
    assert clean.clean_text(decomposed, _dcfg(), stats) == "한국어"


def test_clean_is_nfc_not_nfkc():
    stats = collections.Counter()
    text = "ㅋㅋㅋ ㅎㅎ ① Ａ"
    out = clean.clean_text(text, _dcfg(), stats)
    assert out == text
    assert [hex(ord(c)) for c in "ㅋㅎ"] == ["0x314b", "0x314e"]  # compatibility jamo, unchanged
    assert "\u110f" not in out  # NFKC would turn ㅋ (U+314B) into conjoining ᄏ (U+110F)
    assert out != unicodedata.normalize("NFKC", text)


def test_clean_unescaped_entities_are_renormalized():
    stats = collections.Counter()
    assert clean.clean_text("&#4370;&#4449;&#4523;글", _dcfg(), stats) == "한글"


# The other cleaning rules and the filters are tested in test_clean.py.


def test_hangul_ratio():
    assert clean.hangul_ratio("대한민국 헌법") == 1.0
    # non-space: 한국어(3 Hangul) + 漢字(2) + ABC(3) + 123(3) = 11 characters, 3 Hangul
    assert clean.hangul_ratio("한국어 漢字 ABC 123") == pytest.approx(3 / 11)
    assert clean.hangul_ratio("한국어.") == pytest.approx(3 / 4)
    assert clean.hangul_ratio("ㅋㅋㅋ ㅎㅎ") == 1.0  # compatibility jamo
    assert clean.hangul_ratio("\u1112\u1161\u11ab") == 1.0  # conjoining jamo
    assert clean.hangul_ratio("ㅋㅋ!!") == 0.5
    assert clean.hangul_ratio("") == 0.0
    assert clean.hangul_ratio(" \n\t ") == 0.0


def test_rejection_filters():
    cfg = _dcfg(min_chars=10, min_hangul_ratio=0.3)
    assert clean.rejection("짧은 글", cfg) == "too_short"
    assert clean.rejection("This sentence is English 거의.", cfg) == "low_hangul_ratio"
    assert clean.rejection("대한민국은 민주공화국이다.", cfg) is None


# ---------------------------------------------------------------------------------------------- sources

TXT = "첫째 문단의 첫 줄\n첫째 문단의 둘째 줄\n\n둘째 문단\n\n\n셋째 문단\n"


def _read(path, mode="paragraph", field="text"):
    stats = collections.Counter()
    return list(sources.read_file(Path(path), mode, field, stats)), stats


def test_read_txt_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(TXT, encoding="utf-8")
    docs, _ = _read(p, "file")
    assert [d.text for d in docs] == [TXT]
    docs, _ = _read(p, "paragraph")
    assert len(docs) == 3
    assert docs[0].text == "첫째 문단의 첫 줄\n첫째 문단의 둘째 줄"
    assert docs[1].text == "둘째 문단"
    assert docs[2].text.strip() == "셋째 문단"
    assert all(d.meta["source"] == str(p) for d in docs)
    assert len({d.id for d in docs}) == 3
    docs, _ = _read(p, "line")
    assert [d.text for d in docs] == ["첫째 문단의 첫 줄", "첫째 문단의 둘째 줄", "둘째 문단", "셋째 문단"]


def test_read_txt_crlf_paragraphs(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes("가나다\r\n라마바\r\n\r\n사아자".encode("utf-8"))
    docs, _ = _read(p, "paragraph")
    assert [d.text for d in docs] == ["가나다\n라마바", "사아자"]


JSONL_LINES = [
    json.dumps({"a": {"b": "중첩된 필드의 본문입니다."}, "id": 1}, ensure_ascii=False),
    "",
    "{이것은 JSON이 아니다",
    json.dumps({"a": {"c": "필드가 없는 레코드"}}, ensure_ascii=False),
    json.dumps({"a": "문자열"}, ensure_ascii=False),
    json.dumps({"a": {"b": 3}}),
    "[1, 2]",
    json.dumps({"a": {"b": "두 번째 본문입니다."}}, ensure_ascii=False),
]


def _check_jsonl(docs, stats, path):
    assert [d.text for d in docs] == ["중첩된 필드의 본문입니다.", "두 번째 본문입니다."]
    assert [d.id for d in docs] == [f"{path}:1", f"{path}:8"]
    assert stats["bad_json_line"] == 1
    assert stats["missing_text_field"] == 4


def test_read_jsonl_nested_field_and_bad_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(JSONL_LINES) + "\n", encoding="utf-8")
    docs, stats = _read(p, field="a.b")
    _check_jsonl(docs, stats, p)


def test_read_jsonl_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(JSONL_LINES) + "\n")
    docs, stats = _read(p, field="a.b")
    _check_jsonl(docs, stats, p)


def test_read_cp949(tmp_path):
    text = "안녕하세요. 한국어 문서입니다.\n\n둘째 문단, 똠방각하 뷁."
    p = tmp_path / "euckr.txt"
    p.write_bytes(text.encode("cp949"))
    docs, stats = _read(p, "paragraph")
    assert [d.text for d in docs] == ["안녕하세요. 한국어 문서입니다.", "둘째 문단, 똠방각하 뷁."]
    assert stats["encoding:cp949"] == 1
    assert stats["undecodable_chars"] == 0


def test_read_utf8_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeff첫 문단\n\n둘째 문단".encode("utf-8"))
    docs, stats = _read(p, "paragraph")
    assert [d.text for d in docs] == ["첫 문단", "둘째 문단"]
    assert not any(k.startswith("encoding:") for k in stats)
    q = tmp_path / "bom.jsonl"
    q.write_bytes(("\ufeff" + json.dumps({"text": "본문"}, ensure_ascii=False) + "\n").encode("utf-8"))
    docs, stats = _read(q)
    assert [d.text for d in docs] == ["본문"]
    assert stats["bad_json_line"] == 0


def test_expand(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "c.jsonl", "sub/d.txt"):
        (tmp_path / name).write_text("내용", encoding="utf-8")
    got = sources.expand(f"{tmp_path}/*.txt")
    assert got == [tmp_path / "a.txt", tmp_path / "b.txt"]
    got = sources.expand(f" {tmp_path}/c.jsonl , {tmp_path}/*.txt ,")
    assert got == [tmp_path / "c.jsonl", tmp_path / "a.txt", tmp_path / "b.txt"]
    assert tmp_path / "sub" / "d.txt" in sources.expand(f"{tmp_path}/**/*.txt")
    with pytest.raises(KslmError, match="matches no file"):
        sources.expand(f"{tmp_path}/a.txt,{tmp_path}/missing.txt")
    with pytest.raises(KslmError, match="matches no file"):
        sources.expand(f"{tmp_path}/*.csv")
    with pytest.raises(KslmError, match="empty"):
        sources.expand(" , ")
    with pytest.raises(KslmError, match="directory"):
        sources.expand(str(tmp_path / "sub"))


# ---------------------------------------------------------------------------------------------- prepare

P1 = "대한민국의 수도는 서울이며 가장 큰 도시이다."
KEPT = [
    P1,
    "부산은 대한민국 제2의 도시로 항구가 유명하다.",
    "제주도는 화산섬으로 한라산이 섬 한가운데에 있다.",
    "광주와 대구는 각각 호남과 영남의 중심 도시이다.",
    "<개정 2010.1.1> 이 조항은 새로 고쳐졌다고 한다.",
]


def _corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paragraphs = [
        P1,
        KEPT[1],
        P1,                                                  # exact duplicate
        "짧은 글",                                            # too short
        "The quick brown fox jumps over the lazy dog 여우.",   # low Hangul ratio
        KEPT[2],
        "  대한민국의    수도는 서울이며\t가장 큰 도시이다.  ",  # duplicate after cleaning
    ]
    (src / "a.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    lines = [
        json.dumps({"text": f"<p>{P1}</p>"}, ensure_ascii=False),  # duplicate after tag removal
        json.dumps({"text": KEPT[3]}, ensure_ascii=False),
        json.dumps({"text": "&lt;개정 2010.1.1&gt; 이 조항은 새로 고쳐졌다고 한다."}, ensure_ascii=False),
        json.dumps({"text": "오류"}, ensure_ascii=False),         # too short
        json.dumps({"foo": "필드가 없다"}, ensure_ascii=False),     # missing field
        "{깨진 줄",                                                # bad JSON
    ]
    (src / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = base_config()
    cfg.data.sources = f"{src}/*.txt,{src}/*.jsonl"
    cfg.data.text_mode = "paragraph"
    cfg.data.min_chars = 10
    cfg.data.min_hangul_ratio = 0.3
    cfg.data.val_fraction = 0.5
    return src, cfg


def _split_texts(folder, split):
    return [json.loads(line)["text"] for p in sorted(folder.glob(f"{split}-*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines()]


def test_prepare_end_to_end(tmp_path):
    src, cfg = _corpus(tmp_path)
    before = _files(src)
    out = tmp_path / "work" / "clean"
    report = prepare.prepare(cfg, out)

    assert _files(src) == before  # inputs untouched
    assert report["files"] == 2
    assert report["docs_in"] == 11
    assert report["dropped"] == {"exact_duplicate": 3, "too_short": 2, "low_hangul_ratio": 1}
    assert report["docs_out"]["train"] + report["docs_out"]["val"] == len(KEPT)
    assert report["cleaning"]["bad_json_line"] == 1
    assert report["cleaning"]["missing_text_field"] == 1
    assert report["cleaning"]["html_tags"] == 2
    assert report["cleaning"]["html_entities"] == 1
    assert report["per_source"][str(src / "a.txt")]["dropped:exact_duplicate"] == 2
    assert report["per_source"][str(src / "b.jsonl")]["dropped:exact_duplicate"] == 1
    assert report["per_source"][str(src / "a.txt")]["docs_out"] == 3
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    assert prepare.format_report(report).count("dropped:") == 3

    train, val = _split_texts(out, "train"), _split_texts(out, "val")
    expected = {"train": [t for t in KEPT if prepare.split_of(t, 0.5) == "train"],
                "val": [t for t in KEPT if prepare.split_of(t, 0.5) == "val"]}
    assert train == expected["train"] and val == expected["val"]  # input order kept, split by text hash
    assert report["docs_out"] == {"train": len(train), "val": len(val)}
    assert report["chars_out"]["train"] == sum(map(len, train))
    assert list(prepare.read_clean(out, "train")) == train
    assert not list(out.parent.glob(".clean.partial-*"))


def test_prepare_is_byte_identical_across_runs(tmp_path):
    src, cfg = _corpus(tmp_path)
    out1, out2 = tmp_path / "w1" / "clean", tmp_path / "w2" / "clean"
    prepare.prepare(cfg, out1)
    prepare.prepare(cfg, out2)
    first = _files(out1)
    assert any(name.endswith(".jsonl") for name in first)
    assert first == _files(out2)
    prepare.prepare(cfg, out1)  # replacing an existing output
    assert _files(out1) == first
    assert sorted(p.name for p in out1.parent.iterdir()) == ["clean"]


def test_prepare_nothing_left_is_an_error_and_leaves_no_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("짧다\n\nEnglish only text here, no Korean.\n", encoding="utf-8")
    cfg = base_config()
    cfg.data.sources = str(src / "a.txt")
    out = tmp_path / "work" / "clean"
    with pytest.raises(KslmError, match="no documents left"):
        prepare.prepare(cfg, out)
    assert list((tmp_path / "work").iterdir()) == []


def test_split_of_is_stable():
    texts = [f"문서 번호 {i}번의 내용입니다." for i in range(2000)]
    first = [prepare.split_of(t, 0.1) for t in texts]
    assert first == [prepare.split_of(t, 0.1) for t in texts]
    assert first == [prepare.split_of(t, 0.1) for t in reversed(texts)][::-1]
    assert 0.07 < first.count("val") / len(texts) < 0.13
    assert {prepare.split_of(t, 0.0) for t in texts} == {"train"}
    # a larger held-out fraction only moves documents from train to val
    wider = [prepare.split_of(t, 0.3) for t in texts]
    assert all(w == "val" for f, w in zip(first, wider) if f == "val")


def test_tokenize_with_empty_val_split(tmp_path, prepared):
    src, cfg = _corpus(tmp_path)
    cfg.data.val_fraction = 0.0
    clean_dir = tmp_path / "work" / "clean"
    report = prepare.prepare(cfg, clean_dir)
    assert report["docs_out"]["val"] == 0
    try:
        manifest = shards.tokenize(clean_dir, prepared / "tokenizer" / "spm.model", tmp_path / "work" / "tokens")
    except KslmError as e:  # a clear error would also do, but not one that says prepare never ran
        assert "kslm prepare" not in str(e)
    else:
        assert manifest["train"]["docs"] == len(KEPT) and manifest["val"]["docs"] == 0


# ---------------------------------------------------------------------------------------------- tokenizer

ROUNDTRIP = [
    "대한민국은 민주공화국이다.",
    "제1조 ① 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "2024년 3월 15일 Seoul에서 AI 회의가 열렸다.",
    "國會는 法律을 制定한다. 憲法 제40조",
    "오늘 정말 재밌었다 ㅋㅋㅋ ㅎㅎ 😀👍",
    "가격은 12,345원이고 문의는 [EMAIL] 또는 [URL]로.",
    "첫 줄\n둘째 줄\n\n새 문단",
    "띄어쓰기가  두 칸",
]


@pytest.fixture(scope="module")
def sp(prepared):
    return tok_lib.load(prepared / "tokenizer" / "spm.model")


@pytest.mark.parametrize("text", ROUNDTRIP)
def test_tokenizer_roundtrip(sp, text):
    assert unicodedata.is_normalized("NFC", text)
    ids = sp.EncodeAsIds(text)
    assert ids and tok_lib.UNK not in ids
    assert sp.DecodeIds(ids) == text


def test_tokenizer_byte_fallback_for_rare_characters(sp):
    for rare in ("😀", "ㅋ", "憲"):
        ids = sp.EncodeAsIds(rare)
        assert sp.DecodeIds(ids) == rare
    ids = sp.EncodeAsIds("😀")
    assert sum(sp.IsByte(i) for i in ids) == 4  # four UTF-8 bytes


def test_tokenizer_splits_digits(sp):
    pieces = sp.EncodeAsPieces("12345")
    assert [p.replace("▁", "") for p in pieces if p.replace("▁", "")] == list("12345")
    digit_pieces = [p.replace("▁", "") for p in sp.EncodeAsPieces("제2024조 3,000원") if any(c.isdigit() for c in p)]
    assert digit_pieces == list("2024") + list("3") + list("000")


def test_tokenizer_special_ids(sp):
    assert sp.pad_id() == tok_lib.PAD and sp.unk_id() == tok_lib.UNK
    assert sp.bos_id() == tok_lib.BOS and sp.eos_id() == tok_lib.EOS
    assert sp.GetPieceSize() == 1000


def test_fertility(sp, prepared):
    texts = list(prepare.read_clean(prepared / "data" / "clean", "val"))
    f = tok_lib.fertility(sp, texts)
    assert set(f) == {"docs", "chars", "eojeols", "tokens", "tokens_per_char", "tokens_per_word", "tokens_per_byte", "byte_fallback_rate",
                      "vocab_used"}
    assert f["tokens"] == sum(len(sp.EncodeAsIds(t)) for t in texts)
    assert 0 < f["tokens_per_char"] < 2
    assert f["tokens_per_byte"] < f["tokens_per_char"] < f["tokens_per_word"]
    assert 0 <= f["byte_fallback_rate"] < 0.5
    assert 0 < f["vocab_used"] <= 1
    assert tok_lib.fertility(sp, []) == {}
    with pytest.raises(KslmError, match="not found"):
        tok_lib.load(prepared / "missing.model")


# ---------------------------------------------------------------------------------------------- shards


def _records(files):
    out = []
    for f in files:
        reader = array_record_module.ArrayRecordReader(str(f))
        out.extend(np.frombuffer(r, shards.TOKEN_DTYPE) for r in reader.read_all())
        reader.close()
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_lengths_match_records(prepared, sp, split):
    tokens_dir = prepared / "data" / "tokens"
    files = shards.shard_files(tokens_dir, split)
    lengths = shards.lengths(files)
    records = _records(files)
    manifest = shards.read_manifest(tokens_dir)
    assert len(records) == len(lengths) == manifest[split]["docs"]
    assert [len(r) for r in records] == lengths.tolist()
    assert int(lengths.sum()) == manifest[split]["tokens"]
    assert all(r[0] == tok_lib.BOS and r[-1] == tok_lib.EOS for r in records)
    assert manifest["vocab_size"] == sp.GetPieceSize()
    texts = list(prepare.read_clean(prepared / "data" / "clean", split))
    assert sum(map(len, texts)) == manifest[split]["chars"]
    for text, rec in zip(texts[:50], records[:50]):
        assert np.array_equal(shards.encode_doc(sp, text), rec)
        assert sp.DecodeIds(rec[1:-1].tolist()) == text


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("split,seq_len", [("train", 64), ("train", 7), ("val", 64)])
def test_chunk_source_covers_every_pair_once(prepared, split, seq_len):
    files = shards.shard_files(prepared / "data" / "tokens", split)
    records = _records(files)
    src = pipeline.ChunkSource(files, seq_len)
    assert len(src) == sum(-(-(len(r) - 1) // seq_len) for r in records)
    ins = collections.defaultdict(list)
    tgs = collections.defaultdict(list)
    total = 0
    for i in range(len(src)):
        c = src[i]
        assert c["inputs"].dtype == np.int32 and c["targets"].dtype == np.int32
        assert 1 <= len(c["inputs"]) == len(c["targets"]) <= seq_len
        assert np.array_equal(c["inputs"][1:], c["targets"][:-1])
        total += len(c["inputs"])
        ins[int(src.doc[i])].append(c["inputs"])
        tgs[int(src.doc[i])].append(c["targets"])
    assert total == sum(len(r) - 1 for r in records)
    assert sorted(ins) == list(range(len(records)))
    for d, rec in enumerate(records):  # chunks in order reassemble each document's (input, target) pairs
        assert np.array_equal(np.concatenate(ins[d]), rec[:-1])
        assert np.array_equal(np.concatenate(tgs[d]), rec[1:])


def _pipe_cfg(**changes):
    return _dcfg(**{"seq_len": 64, "packing_bins": 4, "seed": 0, **changes})


def _chunk_multiset(files, seq_len):
    src = pipeline.ChunkSource(files, seq_len)
    return collections.Counter(
        (c["inputs"].tobytes(), c["targets"].tobytes()) for c in (src[i] for i in range(len(src))))


def _segments(b):
    """(row, segment id, inputs, targets) of every segment in a batch, after checking the packing invariants."""
    out = []
    inputs, targets, pos, seg = b["inputs"], b["targets"], b["positions"], b["segment_ids"]
    for r in range(inputs.shape[0]):
        s, p = seg[r], pos[r]
        real = s > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end of a row
        assert (p[n:] == 0).all() and (inputs[r, n:] == 0).all() and (targets[r, n:] == 0).all()
        if n:
            assert s[0] == 1 and np.all(np.diff(s[:n]) >= 0) and np.all(np.diff(s[:n]) <= 1)
        for j in range(n):
            if j == 0 or s[j] != s[j - 1]:
                assert p[j] == 0
            else:
                assert p[j] == p[j - 1] + 1
            if j + 1 < n and s[j + 1] == s[j]:
                assert targets[r, j] == inputs[r, j + 1]
        for sid in np.unique(s[:n]):
            m = s == sid
            out.append((r, int(sid), inputs[r, m], targets[r, m]))
    return out


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.FEATURES + ("positions",
                                                                                           "segment_ids"))


@pytest.fixture(scope="module")
def train_chunks(prepared):
    return _chunk_multiset(shards.shard_files(prepared / "data" / "tokens", "train"), 64)


def test_train_batches_are_packed_correctly(prepared, train_chunks):
    ds = pipeline.train_dataset(prepared / "data" / "tokens", _pipe_cfg(), 8)
    it = iter(ds)
    seen = collections.Counter()
    for _ in range(10):
        b = next(it)
        assert set(b) == {"inputs", "targets", "positions", "segment_ids"}
        for k, v in b.items():
            assert v.shape == (8, 64) and v.dtype == np.int32, k
        assert (b["segment_ids"] > 0).sum() > 0.8 * b["inputs"].size  # packing fills most of each row
        for _, _, x, y in _segments(b):
            key = (x.tobytes(), y.tobytes())
            assert key in train_chunks  # each segment is a whole chunk of one document, targets included
            seen[key] += 1
    # 10 batches are well inside the first epoch: no chunk repeats yet (ignoring identical chunks in the corpus)
    assert all(n <= train_chunks[k] for k, n in seen.items())


def test_train_iterator_is_deterministic_and_resumable(prepared):
    tokens = prepared / "data" / "tokens"
    cfg = _pipe_cfg()
    a = [b for _, b in zip(range(5), iter(pipeline.train_dataset(tokens, cfg, 8)))]
    b = [b for _, b in zip(range(5), iter(pipeline.train_dataset(tokens, cfg, 8)))]
    assert _same(a, b)

    it = iter(pipeline.train_dataset(tokens, cfg, 8))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(3)]
    assert _same(a[3:5], expected[:2])
    it2 = iter(pipeline.train_dataset(tokens, cfg, 8))
    it2.set_state(copy.deepcopy(state))
    resumed = [next(it2) for _ in range(3)]
    assert _same(expected, resumed)

    other = next(iter(pipeline.train_dataset(tokens, _pipe_cfg(seed=1), 8)))
    assert not np.array_equal(other["inputs"], a[0]["inputs"])


def test_eval_batches_cover_val_once_and_pad(prepared):
    tokens = prepared / "data" / "tokens"
    manifest = shards.read_manifest(tokens)
    cfg = _pipe_cfg()
    batches = list(pipeline.eval_batches(tokens, cfg, 8))
    assert batches
    for b in batches:
        for v in b.values():
            assert v.shape == (8, 64)
    total = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert total == manifest["val"]["tokens"] - manifest["val"]["docs"]

    got = collections.Counter()
    for b in batches:
        for _, _, x, y in _segments(b):
            got[(x.tobytes(), y.tobytes())] += 1
    assert got == _chunk_multiset(shards.shard_files(tokens, "val"), 64)  # every val chunk exactly once

    rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
    assert len(batches) == -(-rows // 8)
    last_real = (batches[-1]["segment_ids"].max(axis=1) > 0)
    assert last_real.sum() == rows - 8 * (len(batches) - 1)
    assert not last_real[last_real.sum():].any()  # empty rows pad the end of the last batch
    assert all((b["segment_ids"].max(axis=1) > 0).all() for b in batches[:-1])

    assert _same(batches, list(pipeline.eval_batches(tokens, cfg, 8)))  # fixed order
    assert len(list(pipeline.eval_batches(tokens, cfg, 8, max_batches=2))) == 2


def test_eval_last_batch_is_padded(prepared):
    """With a batch size that does not divide the packed rows, the last batch still has the full size."""
    tokens = prepared / "data" / "tokens"
    cfg = _pipe_cfg()
    rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in pipeline.eval_batches(tokens, cfg, 1))
    size = next(n for n in (3, 5, 6, 7, 9, 11, 13) if rows % n)
    batches = list(pipeline.eval_batches(tokens, cfg, size))
    assert all(b["inputs"].shape == (size, 64) for b in batches)
    assert int((batches[-1]["segment_ids"].max(axis=1) == 0).sum()) == size - rows % size
