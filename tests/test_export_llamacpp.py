"""GGUF in llama.cpp itself (llama-cpp-python): Korean tokenization, logits and greedy text agree with JAX.

The model is the suite's tiny one trained 20 steps (`trained_tiny`: d_model 64, GQA 4/2 heads, the
1000-piece Korean tokenizer). Random weights would not do: drawn large enough to give peaked logits, a
random network amplifies rounding so much that Q4_0 flips most greedy tokens (measured), which says nothing
about trained models. Tolerances were measured here and set with headroom: F16 rounds each weight to 11
bits; Q8_0 and Q4_0 keep blocks of 32 weights with one scale, and llama.cpp also rounds activations to
8 bits for those matrix products.
"""
import jax
import numpy as np
import pytest
from conftest import random_params
from extras import needs, optional

from kslm_jax.core import config as config_lib
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import gguf_io
from kslm_jax.model import llama

pytestmark = [needs("llamacpp", "llama_cpp"), needs("export", "gguf")]
llama_cpp, gguf = optional("llama_cpp"), optional("gguf")

# Digits (split one by one), Latin, punctuation, double spaces, a newline, and characters outside the
# vocabulary that must fall back to UTF-8 byte pieces: emoji, hanja, an archaic jamo.
SENTENCES = ["대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
             "이 법은 2024년 7월 1일부터 시행한다.", "KSLM 모델은 JAX로 학습했다!  정말 🙂",
             "漢字와 한글을 섞어 쓴 문장 ㆍ ᄀᆞ", "줄바꿈\n다음 줄   공백 셋", " 앞에 공백"]
# Largest |logit difference| allowed; measured on 6 sentences (logits' std 0.85): F16 0.0004, Q8_0 0.006,
# Q4_0 0.076, with every argmax the same as JAX's.
TOLERANCE = {"f16": 0.003, "q8_0": 0.03, "q4_0": 0.3}
# Greedy tokens that must agree with JAX's from each of 3 prompts; measured: all 40 tried, in every format.
GREEDY = {"f16": 16, "q8_0": 16, "q4_0": 8}


@pytest.fixture(scope="module")
def model(trained_tiny):
    t = trained_tiny
    return t.cfg, _Forward(t.model), t.params, t.sp


class _Forward:
    """JAX logits of one sequence, padded to a fixed length so that one compilation serves every call
    (causal attention: the padding after the sequence does not change its logits)."""

    def __init__(self, jax_model, length: int = 64):
        self.length = length
        self.fn = jax.jit(lambda p, t: jax_model.apply({"params": p}, t))

    def __call__(self, params, ids):
        assert len(ids) <= self.length
        tokens = np.zeros((1, self.length), np.int32)
        tokens[0, :len(ids)] = ids
        return np.asarray(self.fn(params, tokens))[0, :len(ids)]


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    cfg, _, params, sp = model
    folder = tmp_path_factory.mktemp("gguf_files")
    return {q: gguf_io.write_gguf(params, cfg, sp, folder / f"model-{q}.gguf", q) for q in gguf_io.QUANTS}


def _load(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, seed=0, verbose=False, **kw)


def _jax_greedy(forward, params, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(forward(params, ids)[-1].argmax()))
    return ids[-n:]


def _llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_tokenization_matches_sentencepiece(model, files):
    sp = model[3]
    llm = _load(files["f16"], vocab_only=True)
    fallback = 0
    for text in SENTENCES:
        ours = [sp.bos_id()] + sp.EncodeAsIds(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == ours, text
        assert llm.detokenize(ours).decode("utf-8") == sp.DecodeIds(ours)
        fallback += sum(sp.IsByte(i) for i in ours)
    assert fallback >= 8  # the sentences do exercise the byte pieces
    assert llm.token_bos() == tok_lib.BOS and llm.token_eos() == tok_lib.EOS


@pytest.mark.parametrize("quant", gguf_io.QUANTS)
def test_logits_and_greedy_match_jax(model, files, quant):
    _, forward, params, sp = model
    llm = _load(files[quant], logits_all=True)
    worst = 0.0
    for text in SENTENCES[:4]:
        ids = [sp.bos_id()] + sp.EncodeAsIds(text)
        ours = forward(params, ids)
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)])
        assert theirs.shape == ours.shape  # padded rows included: the file holds the model's full width
        worst = max(worst, float(np.abs(theirs - ours).max()))
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9, text
    assert worst < TOLERANCE[quant], worst
    n = GREEDY[quant]
    for text in SENTENCES[:3]:
        prompt = [sp.bos_id()] + sp.EncodeAsIds(text[:10])
        assert _llama_greedy(llm, prompt, n) == _jax_greedy(forward, params, prompt, n), text


def test_widths_off_the_block_size_fall_back_to_f16(prepared, model, tmp_path):
    """llama.cpp quantizes rows in blocks of 32; a 48-wide model keeps those matrices in F16 (per tensor,
    as llama.cpp's own converter does) and the file still runs."""
    sp = model[3]
    cfg = config_lib.read_workdir_config(prepared)
    for item in ("model.d_model=48", "model.n_heads=3", "model.n_kv_heads=1", "model.d_ff=64", "model.n_layers=1"):
        config_lib.apply_override(cfg, item)
    jax_model, params = random_params(llama.ModelConfig.from_config(cfg), std=0.3)
    path = gguf_io.write_gguf(params, cfg, sp, tmp_path / "odd.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q4_0"  # 64 inputs: two whole blocks
    ids = [sp.bos_id()] + sp.EncodeAsIds(SENTENCES[1])
    llm = _load(path, logits_all=True)
    llm.eval(ids)
    ours = _Forward(jax_model)(params, ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    # random weights amplify the one Q4_0 matrix's rounding (see the module docstring), so agreement is
    # judged by correlation (measured 0.997); a misread F16 tensor would leave next to none
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99
