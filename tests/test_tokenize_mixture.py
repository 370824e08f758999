"""`kslm tokenize` in parallel and resumable after a crash; sources mixed by weight in the loader."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_module

from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline, shards
from kslm_jax.data import tokenizer as tok_lib

SOURCES = {"news/a.jsonl": "경제 성장률이 올해 {i}퍼센트로 전망된다는 보도가 나왔다.",
           "reviews/b.jsonl.gz": "이 영화 정말 재밌어요 {i}번 봤어요 ㅋㅋ"}


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    """Three train shards and one val shard of clean records from two sources, as `kslm prepare` writes them."""
    d = tmp_path_factory.mktemp("mix") / "clean"
    d.mkdir()
    rows = [{"id": f"{src}:{i}", "text": tmpl.format(i=i), "source": src}
            for i in range(150) for src, tmpl in SOURCES.items()]
    for k in range(3):
        with open(d / f"train-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for r in rows[k * 100:(k + 1) * 100]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (d / "val-00000.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:10]),
                                       encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def model_path(prepared):
    return prepared / "tokenizer" / "spm.model"


def _records(folder):
    out = []
    for f in shards.shard_files(folder, "train"):
        r = array_record_module.ArrayRecordReader(str(f))
        out += [np.frombuffer(b, shards.TOKEN_DTYPE).tolist() for b in r.read_all()]
        r.close()
    return out


@pytest.fixture(scope="module")
def serial(clean_dir, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "tokens"
    return out, shards.tokenize(clean_dir, model_path, out, workers=1)


def test_parallel_equals_serial(clean_dir, model_path, serial, tmp_path):
    out, manifest = serial
    par = shards.tokenize(clean_dir, model_path, tmp_path / "tokens", workers=2)
    assert par == manifest
    assert _records(tmp_path / "tokens") == _records(out)
    assert manifest["train"]["docs"] == 300 and len(manifest["train"]["files"]) == 3
    assert {k: v["docs"] for k, v in manifest["train"]["sources"].items()} == {s: 150 for s in SOURCES}
    sp = tok_lib.load(model_path)
    first = _records(out)[0]
    assert sp.DecodeIds(first[1:-1]) == SOURCES["news/a.jsonl"].format(i=0)


def test_killed_tokenize_resumes_without_redoing_finished_shards(clean_dir, model_path, serial, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "tokens"
    real, calls = shards.tokenize_file, []

    def dies_on_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped in the middle of shard 2
        return real(*args)

    monkeypatch.setattr(shards, "tokenize_file", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        shards.tokenize(clean_dir, model_path, out, workers=1)
    assert not out.exists()  # readers never see a partial set
    calls.clear()
    monkeypatch.setattr(shards, "tokenize_file", lambda *a: (calls.append(a[1]), real(*a))[1])
    manifest = shards.tokenize(clean_dir, model_path, out, workers=1)
    assert [c.rsplit("/", 1)[1] for c in calls] == ["train-00001.jsonl", "train-00002.jsonl", "val-00000.jsonl"]
    assert manifest == serial[1] and _records(out) == _records(serial[0])
    assert not list(out.parent.glob(".tokens.staging*"))


def test_staging_from_other_inputs_is_discarded(clean_dir, model_path, serial, tmp_path):
    out = tmp_path / "tokens"
    stale = tmp_path / ".tokens.staging"
    stale.mkdir()
    (stale / "job.json").write_text('{"tokenizer_crc32": 1, "clean": {}}')
    (stale / "train-00000.arrayrecord").write_bytes(b"junk")
    (stale / "train-00000.arrayrecord.done.json").write_text(json.dumps({"file": {"bytes": 4}}))
    assert shards.tokenize(clean_dir, model_path, out, workers=1) == serial[1]


def _cfg(mixture, seq_len=32):
    c = config_lib.base_config()
    with c.unlocked():
        c.data.seq_len, c.data.mixture = seq_len, mixture
    return c.data


def _token_shares(tokens_dir, model_path, dcfg, batches=40):
    """Share of each source among the training tokens of the first `batches` batches (one chunk per doc)."""
    sp = tok_lib.load(model_path)
    lead = {sp.EncodeAsIds(t.format(i=0))[0]: src for src, t in SOURCES.items()}
    assert len(lead) == 2
    it = iter(pipeline.train_dataset(tokens_dir, dcfg, 8))
    counts = dict.fromkeys(SOURCES, 0)
    for _ in range(batches):
        b = next(it)
        for row_t, row_s, row_p in zip(b["targets"], b["segment_ids"], b["positions"]):
            for seg in set(row_s[row_s > 0].tolist()):
                where = row_s == seg
                assert row_p[where][0] == 0  # the whole document is in this row
                counts[lead[int(row_t[where][0])]] += int(where.sum())
    total = sum(counts.values())
    return {s: c / total for s, c in counts.items()}, total


def test_mixture_weights_are_shares_of_tokens(serial, model_path):
    tokens, _ = serial
    shares, n = _token_shares(tokens, model_path, _cfg("news/*:0.8,*:0.2", seq_len=64))
    assert n > 10_000
    assert abs(shares["news/a.jsonl"] - 0.8) < 0.04, shares
    natural, _ = _token_shares(tokens, model_path, _cfg("", seq_len=64))
    assert abs(natural["news/a.jsonl"] - 0.8) > 0.1, natural  # not what the data gives by itself


def test_mixed_stream_resumes_exactly(serial):
    tokens, _ = serial
    it = iter(pipeline.train_dataset(tokens, _cfg("news/*:0.7,reviews/*:0.3"), 8))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(3)]
    again = iter(pipeline.train_dataset(tokens, _cfg("news/*:0.7,reviews/*:0.3"), 8))
    again.set_state(state)
    for want in expect:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("spec, words", [
    ("news/*:0.5", "'reviews/b.jsonl.gz' matches no pattern"),
    ("news/*:0.5,wiki/*:0.1,*:0.4", "'wiki/*' matches no training document"),
    ("news/*:abc,*:1", "positive weight"),
    ("news/*:0,*:1", "positive weight"),
])
def test_bad_mixture_is_one_clear_error(serial, spec, words):
    with pytest.raises(KslmError, match=re.escape(words)):
        pipeline.train_dataset(serial[0], _cfg(spec), 8)


def test_split_field_keeps_each_movie_on_one_side(tmp_path):
    """data.split_field=movie_id: every review of a movie is held out, or none is (NSMC rule)."""
    import gzip
    import itertools

    from kslm_jax.data import prepare
    src = tmp_path / "reviews.jsonl.gz"
    with gzip.open(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko" / "nsmc_reviews.jsonl.gz",
                   "rt", encoding="utf-8") as f:
        lines = list(itertools.islice(f, 3000))
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    c = config_lib.base_config()
    with c.unlocked():
        c.data.sources, c.data.split_field, c.data.val_fraction = str(src), "movie_id", 0.3
        c.data.dedup.near = False
    prepare.prepare(c, tmp_path / "clean")
    movie = {json.loads(x)["id"]: json.loads(x)["movie_id"] for x in lines}
    side = {}
    for split in ("train", "val"):
        for f in (tmp_path / "clean").glob(f"{split}-*.jsonl"):
            for line in f.read_text(encoding="utf-8").splitlines():
                line_no = int(json.loads(line)["id"].rsplit(":", 1)[1])
                side.setdefault(movie[json.loads(lines[line_no - 1])["id"]], set()).add(split)
    assert len(side) > 10 and all(len(s) == 1 for s in side.values())
    assert {"train", "val"} == set().union(*side.values())


def test_memory_cache_reads_the_same_tokens(serial):
    files = shards.shard_files(serial[0], "train")
    disk, memory = pipeline.ChunkSource(files, 16, cache_mb=0), pipeline.ChunkSource(files, 16, cache_mb=64)
    assert not disk.cache and memory.cache
    docs = np.random.default_rng(0).integers(0, len(disk.lengths), 200)
    assert all(np.array_equal(a, b) for a, b in zip(disk.read_docs(docs), memory.read_docs(docs)))
    assert all(np.array_equal(disk[i]["inputs"], memory[i]["inputs"]) for i in range(0, len(disk), 7))
