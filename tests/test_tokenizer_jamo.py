"""Jamo (sub-character) tokenization: the decomposition is a bijection, the tokenizer round-trips real and hard
text, marks itself in its model file, encodes the same in worker processes, and GGUF refuses it."""
import json
import pickle
import random
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
from array_record.python import array_record_module
from extras import needs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_tokenizer_variants import HARD, _reviews, _tcfg

from kslm_jax.cli import commands, export_cmd
from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import jamo, shards
from kslm_jax.data import tokenizer as tok_lib

# Characters where a jamo view can go wrong: its own filler, escape and ▁; every block of Hangul jamo
# (conjoining modern and archaic, Extended-A/B, compatibility, halfwidth); syllables; and their neighbours.
TRICKY = (jamo.FILLER + jamo.ESCAPE + jamo.SPACE_MARK + "_ \n\t" + "".join(map(chr, range(0x1100, 0x1200)))
          + "".join(map(chr, range(0x3131, 0x318F))) + "".join(map(chr, range(0xA960, 0xA97D)))
          + "".join(map(chr, range(0xD7B0, 0xD7FC))) + "".join(map(chr, range(0xFFA0, 0xFFDD)))
          + "가각갃하한힣ㅋㅎ漢字😀a1\u2063")
HARD_JAMO = HARD + [
    "ᄀᆞᆯ ᄒᆞᆫ글 옛한글 ᄫᅵ",                  # archaic jamo sequences that NFC leaves decomposed
    "\u1100\u1161\u11a8 \u1100\u1161",           # modern conjoining jamo (not NFC): kept as they are, not composed
    f"{jamo.FILLER}{jamo.ESCAPE}가{jamo.FILLER}{jamo.ESCAPE}",  # the view's own characters in the text
    "ᄒ하ᅡᆫ한 ㅎㅏㄴ ꥸ ힰ ퟻ",                  # lone conjoining, compatibility, Extended-A/B jamo beside syllables
    "\u2581▁ 밑줄▁표시",                           # SentencePiece's own whitespace mark
    "<|user|>안녕하세요<|end|>",
]
NFC_TEXT = st.text(st.characters(blacklist_categories=("Cs",))).map(lambda t: unicodedata.normalize("NFC", t))
TRICKY_TEXT = st.text(st.sampled_from(TRICKY)).map(lambda t: unicodedata.normalize("NFC", t))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Jamo BPE on the same 6,000 reviews the other variants train on."""
    path = tmp_path_factory.mktemp("tokjamo") / "spm.model"
    tok_lib.train(_reviews(6000), path, _tcfg(pretokenize="jamo", special_tokens="<|user|>,<|end|>,<|사용자|>"))
    return path


@pytest.fixture(scope="module")
def sp(trained):
    return tok_lib.load(trained)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(NFC_TEXT, TRICKY_TEXT, st.text(st.sampled_from(TRICKY))))
@example(f"{jamo.ESCAPE}")
@example(f"\u1100{jamo.FILLER}")
def test_decomposition_is_a_bijection(text):
    """recompose ∘ decompose is the identity on any string (NFC or not), so decompose is injective; its output
    holds no syllable and no unescaped character the input had among the view's own."""
    view = jamo.decompose(text)
    assert jamo.recompose(view) == text
    assert not any(jamo.parts(c) for c in view)
    assert len(view) == len(text) + 2 * sum(jamo.parts(c) is not None for c in text) + sum(
        c in jamo.RESERVED + jamo.SPACE_MARK for c in text)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(NFC_TEXT, TRICKY_TEXT), min_size=2, max_size=2))
def test_distinct_texts_have_distinct_views(pair):
    a, b = pair
    assert (jamo.decompose(a) == jamo.decompose(b)) == (a == b)


def test_syllables_are_three_jamo_with_an_explicit_empty_final():
    assert jamo.decompose("한") == "\u1112\u1161\u11ab"
    assert jamo.decompose("하") == "\u1112\u1161" + jamo.FILLER
    # 하 + ᆫ (text that is not NFC; NFC makes it 한) must read back as it was: the lone final is escaped.
    assert jamo.decompose("하\u11ab") == "\u1112\u1161" + jamo.FILLER + jamo.ESCAPE + "\u11ab"
    assert jamo.recompose(jamo.decompose("하\u11ab")) == "하\u11ab"
    assert jamo.decompose("ㅋㅋ漢😀 a") == "ㅋㅋ漢😀 a"  # compatibility jamo, Hanja, emoji, Latin: as they are


def test_recompose_is_total_on_model_output():
    """A generation may stop inside a syllable or emit a stray filler or escape: decode still gives text."""
    assert jamo.recompose("\u1112\u1161") == "하"
    assert jamo.recompose(jamo.FILLER + "a" + jamo.ESCAPE) == "a"
    assert jamo.recompose("\u1161\u11ab") == "\u1161\u11ab"


@pytest.mark.parametrize("texts", ["held_out", "hard"])
def test_roundtrip_held_out_reviews_and_hard_text(sp, texts):
    texts = _reviews(600, skip=10_000) if texts == "held_out" else HARD_JAMO
    assert len(texts) >= len(HARD_JAMO)
    encoded = sp.EncodeAsIds(texts)
    assert [sp.DecodeIds(ids) for ids in encoded] == texts
    assert sp.DecodeIds(encoded) == texts
    assert sp.decode(sp.encode(texts[0])) == texts[0]  # the snake_case aliases go through the view too
    assert all(tok_lib.UNK not in ids for ids in encoded)
    assert encoded[:20] == [sp.EncodeAsIds(t) for t in texts[:20]]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(NFC_TEXT, TRICKY_TEXT))
def test_tokenizer_roundtrips_any_nfc_text(sp, text):
    assert sp.DecodeIds(sp.EncodeAsIds(text)) == text


def test_pieces_learn_whole_syllables_and_the_empty_final(sp):
    """The filler joins the pieces around it (same script): open syllables are not split from their neighbours."""
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    assert any(jamo.FILLER in p and len(p) >= 6 for p in pieces)
    assert "".join(sp.EncodeAsPieces("영화")) == "▁" + jamo.decompose("영화")


def test_model_file_marks_itself(trained, sp, tmp_path):
    """load() finds the variant in the file; read as plain SentencePiece it would see syllables as bytes."""
    assert isinstance(sp, jamo.JamoTokenizer) and tok_lib.pretokenize(sp) == "jamo"
    proto = tok_lib.model_proto(sp)
    assert proto.trainer_spec.required_chars.startswith(jamo.FILLER + jamo.ESCAPE)
    assert not any(sp.IsByte(i) for i in sp.EncodeAsIds(jamo.LETTERS))  # each compatibility letter is a piece
    plain = spm.SentencePieceProcessor(model_file=str(trained))
    assert all(plain.IsByte(i) for i in plain.EncodeAsIds("영화")[1:])
    assert not any(sp.IsByte(i) for i in sp.EncodeAsIds("영화"))
    proto.trainer_spec.required_chars = ""
    (tmp_path / "unmarked.model").write_bytes(proto.SerializeToString())
    assert tok_lib.pretokenize(tok_lib.load(tmp_path / "unmarked.model")) == "none"
    copy = pickle.loads(pickle.dumps(sp))
    assert isinstance(copy, jamo.JamoTokenizer) and copy.EncodeAsIds(HARD_JAMO) == sp.EncodeAsIds(HARD_JAMO)


def test_special_tokens_stay_whole(sp):
    ids = tok_lib.special_ids(sp, ["<|user|>", "<|end|>", "<|사용자|>"], "test")
    text = "<|사용자|>영화 어땠어요?<|end|><|user|>재밌었어요ㅋㅋ<|end|>"
    got = sp.EncodeAsIds(text)
    order = ["<|사용자|>", "<|end|>", "<|user|>", "<|end|>"]
    assert [i for i in got if i in ids.values()] == [ids[n] for n in order]
    assert sp.DecodeIds(got) == text


def test_fertility_counts_original_characters(sp):
    texts = _reviews(200, skip=10_000)
    report = tok_lib.fertility(sp, texts)
    assert report["chars"] == sum(map(len, texts)) and report["eojeols"] == sum(len(t.split()) for t in texts)
    assert report["tokens"] == sum(len(sp.EncodeAsIds(t)) for t in texts)


def test_tokenize_in_worker_processes_matches_encode(trained, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    texts = _reviews(400, skip=20_000) + HARD_JAMO
    for k in range(2):
        with open(clean / f"train-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[k::2]:
                f.write(json.dumps({"text": t, "source": "nsmc"}, ensure_ascii=False) + "\n")
    manifest = shards.tokenize(clean, trained, tmp_path / "tokens", workers=2)
    sp = tok_lib.load(trained)
    for k in range(2):
        reader = array_record_module.ArrayRecordReader(str(tmp_path / "tokens" / f"train-{k:05d}.arrayrecord"))
        got = [np.frombuffer(r, shards.TOKEN_DTYPE).tolist() for r in reader.read_all()]
        reader.close()
        assert got == [[tok_lib.BOS, *sp.EncodeAsIds(t), tok_lib.EOS] for t in texts[k::2]]
        assert [sp.DecodeIds(ids[1:-1]) for ids in got] == texts[k::2]
    assert manifest["train"]["docs"] == len(texts) and manifest["train"]["chars"] == sum(map(len, texts))


@needs("export", "gguf")
def test_gguf_refuses_a_jamo_tokenizer(sp, tmp_path):
    from kslm_jax.export import gguf_io
    cfg = config_lib.load("tiny_ko", ["tokenizer.vocab_size=2000", "tokenizer.pretokenize=jamo"])
    with pytest.raises(KslmError, match="jamo.*llama.cpp cannot decompose"):
        gguf_io.write_gguf(None, cfg, sp, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_workdir_check_knows_the_variant(trained, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(trained.read_bytes())
    cfg = config_lib.load(None, ["tokenizer.vocab_size=2000", "tokenizer.pretokenize=jamo"])
    assert isinstance(tok_lib.check_workdir(cfg, tmp_path), jamo.JamoTokenizer)
    with pytest.raises(KslmError, match="pretokenize=jamo but the config says none"):
        tok_lib.check_workdir(config_lib.load(None, ["tokenizer.vocab_size=2000"]), tmp_path)


def test_typos_touch_the_asked_share_of_syllables_one_jamo_each():
    """The robustness benchmark's noise: about `rate` of the syllables get one swapped, dropped or doubled jamo."""
    rng = random.Random(0)
    syllables = [c for t in _reviews(300, skip=10_000) for c in t if jamo.parts(c)]
    letters = lambda t: len(jamo.decompose(t).replace(jamo.FILLER, ""))  # noqa: E731
    changed = {"swap": 0, "drop": 0, "double": 0}
    for c in syllables:
        out = jamo.inject_typos(c, 0.05, rng)
        if out != c:
            assert unicodedata.is_normalized("NFC", out)
            changed[{0: "swap", -1: "drop", 1: "double"}[letters(out) - letters(c)]] += 1
    assert 0.04 * len(syllables) < sum(changed.values()) < 0.06 * len(syllables)
    assert min(changed.values()) > 0.25 * sum(changed.values())
    assert jamo.inject_typos("abc ㅋㅋ 漢字 😀", 1.0, rng) == "abc ㅋㅋ 漢字 😀"
    outcomes = {jamo.inject_typos("각", 1.0, random.Random(s)) for s in range(300)}
    assert {"가", "ㄱㄱ", "ㅏㄱ", "각ㄱ", "ㄱ각", "각ㅏ"} <= outcomes and "각" not in outcomes


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
def test_hf_and_onnx_export_say_how_to_encode(trained, tmp_path, monkeypatch, capsys, fmt):
    """The exported tokenizer.model is the jamo one: a plain encoder would not decompose, and the note says so."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(trained.read_bytes())
    monkeypatch.setattr(export_cmd.hf_io, "export_hf", lambda workdir, out: None)
    monkeypatch.setattr(export_cmd.onnx_io, "export_onnx", lambda workdir, out: None)
    args = SimpleNamespace(workdir=str(tmp_path), format=fmt, out=str(tmp_path / "out"), quant=None)
    assert commands.export(args, []) == 0
    assert "note: tokenizer.model was trained on the jamo view of Hangul" in capsys.readouterr().out
