"""Tokenizer variants on real reviews: Kiwi morpheme-aware BPE, unigram, and `kslm tokenizer --report`."""
import gzip
import itertools
import json
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from array_record.python import array_record_module
from extras import needs

from kslm_jax.cli import commands
from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import morph, shards
from kslm_jax.data import tokenizer as tok_lib

NSMC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko" / "nsmc_reviews.jsonl.gz"

HARD = [
    "아버지가방에들어가신다.",
    "나는 밥을 먹었다ㅋㅋㅋ 😀👍 漢字를 썼다",
    "  앞뒤 공백과  두 칸 띄어쓰기  ",
    "첫 줄입니다.\n둘째 줄\n\n새 문단\t탭",
    "2024년 3월 15일 Seoul에서 café 회의가 열렸다.",
    "ㅋㅋㅋㅋ ㅠㅠ ㄱㄴㄷ 자모만",
    "띄어쓰기없이아주길게이어지는문장" * 200,  # one 3,200-character eojeol: analysed in chunks
    "\u2063구분자\u2063가 본문에",  # the training delimiter inside the text itself
    "",
]


def _reviews(n: int, skip: int = 0) -> list[str]:
    with gzip.open(NSMC, "rt", encoding="utf-8") as f:
        rows = (json.loads(line)["text"] for line in f)
        return [unicodedata.normalize("NFC", t) for t in itertools.islice(rows, skip, skip + n) if t.strip()]


def _tcfg(**changes):
    return config_lib.load(None, [f"tokenizer.{k}={v}" for k, v in {"vocab_size": 2000, **changes}.items()]).tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same 3,000 reviews under three variants; 600 later reviews held out."""
    d = tmp_path_factory.mktemp("tokvariants")
    train = _reviews(3000)
    out = {}
    for name, changes in {"bpe": {}, "kiwi": {"pretokenize": "kiwi"}, "unigram": {"model_type": "unigram"}}.items():
        tok_lib.train(train, d / name / "spm.model", _tcfg(**changes))
        out[name] = d / name / "spm.model"
    return out


@pytest.fixture(scope="module")
def held_out():
    return _reviews(600, skip=10_000)


def _offsets(sp, ids) -> set[int]:
    """Character offsets at which a token ends (decoding each prefix: exact for text without byte pieces)."""
    return {len(sp.DecodeIds(ids[:k])) for k in range(1, len(ids))}


@pytest.mark.parametrize("variant", ["bpe", "kiwi", "unigram"])
def test_variants_roundtrip_held_out_and_hard_text(trained, held_out, variant):
    sp = tok_lib.load(trained[variant])
    assert tok_lib.pretokenize(sp) == ("kiwi" if variant == "kiwi" else "none")
    assert tok_lib.model_type(sp) == ("unigram" if variant == "unigram" else "bpe")
    texts = held_out + HARD
    encoded = sp.EncodeAsIds(texts)
    assert [sp.DecodeIds(ids) for ids in encoded] == texts
    assert all(tok_lib.UNK not in ids for ids in encoded)
    assert encoded[:20] == [sp.EncodeAsIds(t) for t in texts[:20]]  # a batch encodes as its items alone


def test_kiwi_tokens_never_cross_a_morpheme_cut(trained, held_out):
    kiwi, plain = tok_lib.load(trained["kiwi"]), tok_lib.load(trained["bpe"])
    seg = morph.Segmenter()
    texts = [t for t in held_out[:300] if not any(plain.IsByte(i) or kiwi.IsByte(i) for i in
                                                  plain.EncodeAsIds(t) + kiwi.EncodeAsIds(t))]
    assert len(texts) > 200
    plain_crossings = 0
    for text, cuts in zip(texts, seg.cuts(texts)):
        assert set(cuts) <= _offsets(kiwi, kiwi.EncodeAsIds(text)), text
        plain_crossings += len(set(cuts) - _offsets(plain, plain.EncodeAsIds(text)))
    # The check has teeth: plain BPE, trained on the same text, merges across these cuts.
    assert plain_crossings > 100


def test_kiwi_cuts_are_inside_eojeols_only():
    seg = morph.Segmenter(threads=1)
    text = "나는 밥을 먹었다."
    [cuts] = seg.cuts([text])
    assert [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] == ["나", "는 밥", "을 먹", "었", "다", "."]
    assert seg.mark(["학교에 갔다"]) == [f"학교{morph.DELIMITER}에 갔{morph.DELIMITER}다"]


def test_kiwi_model_pieces_hold_no_delimiter_and_load_knows_the_variant(trained):
    sp = tok_lib.load(trained["kiwi"])
    assert isinstance(sp, morph.MorphTokenizer)
    assert tok_lib.model_proto(sp).trainer_spec.pretokenization_delimiter == morph.DELIMITER
    assert not any(morph.DELIMITER in sp.IdToPiece(i) for i in range(sp.GetPieceSize()))
    with pytest.raises(TypeError, match="add_bos"):
        sp.Encode("밥", add_bos=True)


def test_missing_kiwipiepy_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(morph, "_kiwi", morph._kiwi.__wrapped__)  # the loader itself, not its cached Kiwi
    monkeypatch.setitem(sys.modules, "kiwipiepy", None)
    with pytest.raises(KslmError, match="pip install"):
        morph.Segmenter().cuts(["밥을 먹었다"])


def test_pretokenize_must_be_known():
    with pytest.raises(KslmError, match="tokenizer.pretokenize"):
        config_lib.load(None, ["tokenizer.pretokenize=mecab"])


def test_kiwi_tokenize_in_worker_processes_matches_encode(trained, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    texts = _reviews(400, skip=20_000) + HARD[:6]
    for k in range(2):
        with open(clean / f"train-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[k::2]:
                f.write(json.dumps({"text": t, "source": "nsmc"}, ensure_ascii=False) + "\n")
    manifest = shards.tokenize(clean, trained["kiwi"], tmp_path / "tokens", workers=2)
    sp = tok_lib.load(trained["kiwi"])
    for k in range(2):
        reader = array_record_module.ArrayRecordReader(str(tmp_path / "tokens" / f"train-{k:05d}.arrayrecord"))
        got = [np.frombuffer(r, shards.TOKEN_DTYPE).tolist() for r in reader.read_all()]
        reader.close()
        assert got == [[tok_lib.BOS, *sp.EncodeAsIds(t), tok_lib.EOS] for t in texts[k::2]]
    assert manifest["train"]["docs"] == len(texts)


@needs("export", "gguf")
def test_gguf_refuses_a_kiwi_tokenizer(trained, tmp_path):
    from kslm_jax.export import gguf_io
    cfg = config_lib.load("tiny_ko", ["tokenizer.vocab_size=2000", "tokenizer.pretokenize=kiwi"])
    with pytest.raises(KslmError, match="Kiwi morpheme"):
        gguf_io.write_gguf(None, cfg, tok_lib.load(trained["kiwi"]), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_report_measures_without_retraining(tmp_path, capsys):
    """`kslm tokenizer --report` on the held-out split, and on other text with --text."""
    wd = tmp_path / "run"
    args = SimpleNamespace(workdir=str(wd), config="tiny_ko", force=False, report=False, text=None)
    over = ["tokenizer.vocab_size=1000", "tokenizer.pretokenize=kiwi"]
    commands.prepare(args, over)
    commands.tokenizer(args, over)
    model = wd / "tokenizer" / "spm.model"
    before = (model.read_bytes(), model.stat().st_mtime_ns)
    capsys.readouterr()
    assert commands.tokenizer(SimpleNamespace(**{**vars(args), "report": True}), over) == 0
    out = capsys.readouterr().out
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before
    report = json.loads((wd / "tokenizer" / "report.json").read_text())
    sp = tok_lib.load(model)
    from kslm_jax.data import prepare
    val = list(prepare.read_clean(wd / "data" / "clean", "val"))
    tokens = sum(len(sp.EncodeAsIds(t)) for t in val)
    assert report["tokens"] == tokens and report["docs"] == len(val)
    assert report["tokens_per_char"] == pytest.approx(tokens / sum(map(len, val)))
    assert report["tokens_per_word"] == pytest.approx(tokens / sum(len(t.split()) for t in val))
    assert report["pretokenize"] == "kiwi" and report["model_type"] == "bpe" and report["pieces"] == 1000
    assert f"{report['tokens_per_char']:.4f}" in out and "tokens per eojeol" in out
    other = tmp_path / "other.txt"
    other.write_text("영화가 정말 재밌었어요.\n\n배우들의 연기도 좋았습니다.", encoding="utf-8")
    assert commands.tokenizer(SimpleNamespace(**{**vars(args), "report": True, "text": str(other)}), over) == 0
    out = capsys.readouterr().out
    assert f"measured on {other}" in out and "documents" in out
    assert json.loads((wd / "tokenizer" / "report.json").read_text()) == report  # --text leaves it alone


def test_kiwi_keeps_special_tokens_whole(tmp_path):
    """Chat markers are single pieces under Kiwi too: no morpheme cut lands inside <|user|>."""
    specials = "<|user|>,<|assistant|>,<|end|>"
    train = [f"<|user|>{q}<|end|><|assistant|>{a}<|end|>" for q, a in zip(_reviews(1500), _reviews(1500, skip=5000))]
    sp = tok_lib.train(train, tmp_path / "spm.model", _tcfg(pretokenize="kiwi", special_tokens=specials))
    sp = tok_lib.load(tmp_path / "spm.model")
    ids = tok_lib.special_ids(sp, ["<|user|>", "<|assistant|>", "<|end|>"], "test")
    text = "<|user|>영화 어땠어요?<|end|><|assistant|>정말재밌었어요ㅋㅋ<|end|>"
    got = sp.EncodeAsIds(text)
    assert [i for i in got if i in ids.values()] == [ids["<|user|>"], ids["<|end|>"], ids["<|assistant|>"],
                                                      ids["<|end|>"]]
    assert sp.DecodeIds(got) == text


def test_kiwi_analyses_only_the_sample(tmp_path, monkeypatch):
    """Kiwi sees tokenizer.sample_sentences sentences, not the corpus: its cost stays bounded on many GB."""
    seen = []
    real = morph.Segmenter.cuts

    def counting(self, texts):
        seen.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(morph.Segmenter, "cuts", counting)
    corpus = _reviews(3000)
    tok_lib.train(corpus, tmp_path / "spm.model", _tcfg(vocab_size=1500, pretokenize="kiwi", sample_sentences=500, character_coverage=0.98))
    assert len(seen) == 500 and set(seen) <= {line.strip() for t in corpus for line in t.split("\n")}
    assert tok_lib._reservoir(range(10), 20, 0) == list(range(10))
    draws = [tuple(tok_lib._reservoir(range(1000), 5, s)) for s in range(3)]
    assert len(set(draws)) == 3 and all(len(set(d)) == 5 for d in draws)
    assert tok_lib._reservoir(range(1000), 5, 1) == tok_lib._reservoir(range(1000), 5, 1)
