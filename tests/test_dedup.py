"""Exact and near-duplicate removal: planted near-duplicates with known Jaccard similarity, determinism across
worker counts, and a whole `kslm prepare` run whose report counts what each rule and dedup stage removed."""
import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kslm_jax.cli import commands
from kslm_jax.core import config
from kslm_jax.data import dedup, prepare

KO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"


@pytest.fixture(scope="module")
def sentences():
    with open(KO / "korsts_train.tsv", encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        seen = dict.fromkeys(r[5] for r in rows if len(r) > 6 and len(r[5]) > 15)
    return list(seen)


def _bases(sentences, n, rng):
    """n documents of four KorSTS sentences each, no sentence used twice: unrelated to each other."""
    picked = rng.sample(sentences, 4 * n)
    return [" ".join(picked[4 * i:4 * i + 4]) for i in range(n)]


def _jaccard(a, b, k=5):
    """Exact Jaccard similarity of character k-gram sets, written independently of dedup.MinHasher."""
    def grams(t):
        t = dedup.normalize(t)
        return {t[i:i + k] for i in range(max(1, len(t) - k + 1))}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _edit(text, n_edits, rng):
    chars = list(text)
    for _ in range(n_edits):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.6:
            chars[i] = chr(0xAC00 + rng.randrange(11172))  # a random syllable
        elif op < 0.8:
            del chars[i]
        else:
            chars.insert(i, chr(0xAC00 + rng.randrange(11172)))
    return "".join(chars)


def test_exact_key_normalizes_spacing_punctuation_case():
    key = dedup.exact_key
    assert key("정말 재밌다!!") == key("정말재밌다..") == key("정말  재밌 다") == key("정말 재밌다")
    assert key("Best Movie 10점") == key("best movie 10점")
    assert key("정말 재밌다") != key("정말 재밌었다")
    assert key("!!!") != key("???")  # nothing left to normalize: the text itself is the key


def test_find_duplicates_keeps_first_and_does_not_chain():
    # 1 shares band 0 with 0; 2 shares band 1 only with 1, which is removed, so 2 stays; 3 shares with 2.
    bands = np.array([[1, 2], [1, 3], [4, 3], [4, 5], [6, 7], [6, 7]], np.uint64)
    keys = np.array([10, 11, 12, 13, 14, 14], np.uint64)
    verdict, owner, stats = dedup.find_duplicates(keys, bands)
    assert verdict.tolist() == [0, 2, 0, 2, 0, 1]
    assert owner.tolist() == [-1, 0, -1, 2, -1, -1]
    assert stats == {"exact": {"docs_removed": 1, "clusters": 1}, "near": {"docs_removed": 2, "clusters": 2}}
    keys = np.array([5, 5, 7, 5, 7, 9], np.uint64)
    verdict, _, stats = dedup.find_duplicates(keys, None)
    assert verdict.tolist() == [0, 1, 0, 1, 1, 0] and stats["exact"] == {"docs_removed": 3, "clusters": 2}


def test_signatures_do_not_depend_on_chunking(sentences):
    rng = random.Random(1)
    texts = _bases(sentences, 40, rng) + ["가나다라마바사아자차" * 2000] + ["짧다", "", "!!!"]
    mh = dedup.MinHasher()
    whole = mh.band_hashes_of(texts)
    parts = np.concatenate([mh.band_hashes_of(texts[:7]), mh.band_hashes_of(texts[7:41]), mh.band_hashes_of(texts[41:])])
    assert whole.shape == (len(texts), 14) and (whole == parts).all()
    # the long text crosses several 8192-n-gram blocks; alone it hashes the same
    assert (mh.band_hashes_of(texts[40:41]) == whole[40]).all()


@pytest.fixture(scope="module")
def planted(sentences):
    """400 unrelated documents, then one variant of each with 0 to 32 random character edits."""
    rng = random.Random(0)
    bases = _bases(sentences, 400, rng)
    variants = [_edit(b, rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 8, 12, 16, 24, 32]), rng) for b in bases]
    sims = np.array([_jaccard(b, v) for b, v in zip(bases, variants)])
    return bases + variants, sims, dedup.near_duplicates(bases + variants)


def test_planted_near_duplicates_recall(planted):
    _, sims, (verdict, owner, stats) = planted
    assert (verdict[:400] == dedup.KEEP).all()  # unrelated documents are never merged
    found = verdict[400:] != dedup.KEEP
    high, low = sims >= 0.85, sims < 0.5
    assert high.sum() >= 100 and low.sum() >= 100  # both sides of the threshold are well represented
    assert found[high].mean() >= 0.9
    assert found[low].mean() <= 0.05  # P(candidate) is 2.7% at J = 0.5 and falls fast below it
    near = np.flatnonzero(verdict[400:] == dedup.NEAR)
    assert (owner[400 + near] == near).all()  # each variant is attributed to its own base
    assert stats["near"]["clusters"] == stats["near"]["docs_removed"] == near.size


def test_lsh_pass_in_slices_is_the_same(planted, monkeypatch):
    texts, _, (verdict, owner, _) = planted
    monkeypatch.setattr(dedup, "_GROUPS", 3)
    v, o, _ = dedup.near_duplicates(texts)
    assert (v == verdict).all() and (o == owner).all()


# ---------------------------------------------------------------------------------------------- prepare


def _corpus(folder: Path, sentences):
    """Two sources with known contents: 120 unrelated documents, 12 near and 8 exact duplicates of them,
    two documents with a phone number, and three that a filter drops."""
    rng = random.Random(7)
    docs = _bases(sentences, 120, rng)
    near = [d[:-1] + " 정말" for d in docs[:12]]
    assert min(_jaccard(d, v) for d, v in zip(docs, near)) >= 0.9
    exact = [d.replace(" ", "  ").upper() + "!!" for d in docs[20:28]]
    extra = ["연락은 010-1234-5678 로 주세요, 영화 정말 재미있었어요", "예매 문의 02-123-4567 평일만 받습니다 감사합니다",
             "짧다", "This review is written only in English, sorry.", " ".join(["재미없음"] * 12)]
    a = docs[:60] + near[:6] + exact[:4] + extra
    b = docs[60:] + near[6:] + exact[4:]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in a),
                                    encoding="utf-8")
    (folder / "b.txt").write_text("\n\n".join(b) + "\n", encoding="utf-8")
    return len(a) + len(b)


def _cfg(src: Path, **data):
    cfg = config.base_config()
    cfg.data.sources = f"{src}/a.jsonl,{src}/b.txt"
    cfg.data.val_fraction = 0.2
    cfg.data.shard_docs = 40
    for k, v in data.items():
        cfg.data[k] = v
    config.validate(cfg)
    return cfg


def test_prepare_report_counts(tmp_path, sentences, capsys):
    src = tmp_path / "src"
    src.mkdir()
    n = _corpus(src, sentences)
    wd = tmp_path / "run"
    args = SimpleNamespace(workdir=str(wd), config=None, force=False)
    commands.prepare(args, [f"data.sources={src}/a.jsonl,{src}/b.txt", "data.val_fraction=0.2"])
    table = capsys.readouterr().out
    report = json.loads((wd / "data" / "clean" / "report.json").read_text(encoding="utf-8"))
    assert report["docs_in"] == n == 145
    assert report["dropped"] == {"exact_duplicate": 8, "near_duplicate": 12, "too_short": 1,
                                 "low_hangul_ratio": 1, "repeated_ngrams": 1}
    assert sum(report["docs_out"].values()) == 122  # 120 documents and the two with a phone number
    assert report["dedup"]["exact"] == {"enabled": True, "docs_removed": 8, "clusters": 8}
    near = report["dedup"]["near"]
    assert (near["docs_removed"], near["clusters"], near["bands"], near["rows"]) == (12, 12, 14, 9)
    phones = report["rules"]["phones"]
    assert (phones["kind"], phones["documents"], phones["characters"]) == ("edit", 2, 13 + 11)
    assert phones["examples"] == ["010-****-****", "02-***-****"]
    a, b = (report["per_source"][str(src / name)] for name in ("a.jsonl", "b.txt"))
    assert (a["docs_in"], a["docs_out"], a["dropped:near_duplicate"], a["dropped:exact_duplicate"]) == (75, 62, 6, 4)
    assert (b["docs_in"], b["docs_out"], b["dropped:near_duplicate"], b["dropped:exact_duplicate"]) == (70, 60, 6, 4)
    assert report["rules"]["near_duplicate"]["per_source"][str(src / "b.txt")]["documents"] == 6
    example = report["rules"]["near_duplicate"]["examples"][0]
    assert " ≈ " in example  # the removed document beside the kept one it duplicates
    assert a["chars_out"] + b["chars_out"] == sum(report["chars_out"].values())
    for line in ("dropped: near_duplicate", "dropped: exact_duplicate", "cleaned: phones", "12 clusters",
                 "Jaccard threshold ≈ 0.75", "a.jsonl", "b.txt"):
        assert line in table, line
    texts = [t for s in ("train", "val") for t in prepare.read_clean(wd / "data" / "clean", s)]
    assert len(texts) == 122 and not any("010-1234" in t for t in texts)


def test_prepare_same_bytes_for_one_and_two_workers(tmp_path, sentences, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    _corpus(src, sentences)
    monkeypatch.setattr(prepare, "CHUNK_DOCS", 16)  # ten chunks, so that two workers really share them
    pools = []
    real = prepare.multiprocessing.get_context
    monkeypatch.setattr(prepare.multiprocessing, "get_context", lambda method: pools.append(method) or real(method))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "clean"
        report = prepare.prepare(_cfg(src, prepare_workers=workers), out)
        outputs.append((report, {p.name: p.read_bytes() for p in sorted(out.iterdir())}))
    assert pools == ["spawn"]  # one pool, for the two-worker run
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["dedup"]["near"]["docs_removed"] == 12
    assert sorted(outputs[0][1]) == ["report.json", "train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl",
                                     "val-00000.jsonl"]


def test_prepare_dedup_switches(tmp_path, sentences):
    src = tmp_path / "src"
    src.mkdir()
    _corpus(src, sentences)
    cfg = _cfg(src)
    cfg.data.dedup.near = False
    report = prepare.prepare(cfg, tmp_path / "a")
    assert "near_duplicate" not in report["dropped"] and report["dropped"]["exact_duplicate"] == 8
    cfg.data.dedup.exact = False
    cfg.data.phone_action = "drop"
    report = prepare.prepare(cfg, tmp_path / "b")
    assert "exact_duplicate" not in report["dropped"] and report["dropped"]["phones"] == 2
    assert report["rules"]["phones"]["kind"] == "drop"
    assert sum(report["docs_out"].values()) == 145 - 3 - 2
