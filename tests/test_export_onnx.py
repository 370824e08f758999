"""ONNX export: onnxruntime runs the exported graph and its logits match JAX, tied and untied, MHA and GQA, batched;
decoding through its KV cache gives the uncached logits, and a left-padded batch with its attention mask gives
every row's logits alone."""
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, right_padded
from extras import needs, optional
from test_export_errors import failed_export_keeps

from kslm_jax.cli import commands
from kslm_jax.export import onnx_io
from kslm_jax.model import llama

pytestmark = needs("export", "onnx", "onnxruntime", "torch", "transformers", "onnxscript")
onnx, ort = optional("onnx"), optional("onnxruntime")

SENTENCES = ["대한민국의 주권은 국민에게 있고,", "이 법은 공포한 날부터 시행한다. 2024년 7월 ㅋㅋ",
             "국회는 법률에 저촉되지 아니하는 범위 안에서 의사와 내부규율에 관한 규칙을 제정할 수 있다."]
TOL = dict(atol=1e-4, rtol=1e-4)


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(session, ids, mask=None, past=None):
    """(logits, present): one call; no mask means every token is real, no past means an empty cache."""
    ids = np.asarray(ids, np.int64)
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if past is None:
        kv_heads, head_dim = session.get_inputs()[2].shape[1], session.get_inputs()[2].shape[3]
        past = [np.zeros((len(ids), kv_heads, 0, head_dim), np.float32)] * len(names)
    if mask is None:
        mask = np.ones((len(ids), past[0].shape[2] + ids.shape[1]), np.int64)
    out = session.run(None, {"input_ids": ids, "attention_mask": np.asarray(mask, np.int64), **dict(zip(names, past))})
    return out[0], out[1:]


@pytest.fixture(scope="module")
def cli_export(trained_tiny, tmp_path_factory):
    """`kslm export --format onnx` of the trained workdir, made once for the two tests below (12 s on 2 cores)."""
    out = tmp_path_factory.mktemp("cli_onnx") / "onnx"
    commands.export(SimpleNamespace(workdir=str(trained_tiny.workdir), format="onnx", quant=None, out=str(out)), [])
    return out


def test_cli_export_runs_in_onnxruntime(trained_tiny, cli_export):
    """`kslm export --format onnx` of a trained workdir; Korean sentences tokenized with the shipped tokenizer."""
    import sentencepiece as spm
    t, out = trained_tiny, cli_export
    assert sorted(p.name for p in out.iterdir()) == [".kslm_export.json", "model.onnx", "tokenizer.model"]
    model = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["input_ids"] == ["batch", "seq"] and inputs["attention_mask"][0] == "batch"
    assert len(inputs) == 2 + 2 * t.model.c.n_layers
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    rows = [[sp.bos_id()] + sp.EncodeAsIds(text) for text in SENTENCES]
    for ids, text in zip(rows, SENTENCES):
        assert ids[1:] == t.sp.EncodeAsIds(text)
    # One right-padded batch (pad id 0), one JAX compile: both sides see the same ids, padding included.
    ids = right_padded(rows)
    ours = np.asarray(jax.jit(t.model.apply)({"params": t.params}, jnp.asarray(ids)))
    theirs, _ = _run(_session(out), ids)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, **TOL)


def test_failed_export_keeps_the_previous_one(trained_tiny, cli_export, tmp_path, monkeypatch):
    """tests/test_export_errors.py's case for onnx: the earlier export is a copy of the CLI export above."""
    out = tmp_path / "onnx"
    shutil.copytree(cli_export, out)
    failed_export_keeps(trained_tiny.workdir, out, "onnx", monkeypatch)


# (n_heads, n_kv_heads, tie, n_layers): multi-head, grouped-query, multi-query; tied and untied output. Each
# export traces the model again (seconds per layer on 2 cores), so one variant has two layers (the cache's per-layer
# order) and the others one. The multi-head one is written with its weights in the external data file, so the
# graph tests run on that form too (test_external_data_file checks the files).
VARIANTS = [(4, 4, False, 1), (4, 2, True, 2), (6, 1, False, 1)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "h{}-kv{}-tie{}-l{}".format(*v))
def exported(request, tmp_path_factory):
    heads, kv, tie, layers = request.param
    # Large weights give peaked attention and logits, so a layout mistake cannot hide in near-uniform output.
    c = llama.ModelConfig(vocab_size=256, d_model=48, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=8,
                          d_ff=64, tie_embeddings=tie, rope_theta=500.0)
    model, params = random_params(c, seed=heads * 10 + kv, std=0.3)
    tmp = tmp_path_factory.mktemp("onnx")
    tok = tmp / "tok.model"
    tok.write_bytes(b"stand-in: the graph test does not tokenize")
    out = onnx_io.write_onnx(params, c, tok, tmp / "onnx", external_over=0 if heads == kv else onnx_io.EXTERNAL_OVER)
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
    return SimpleNamespace(c=c, params=params, out=out, session=_session(out),
                           jax=lambda ids: np.asarray(forward(jnp.asarray(ids))))


def test_graph_matches_jax(exported):
    ids = np.random.default_rng(0).integers(0, 256, (3, 37))
    ours = exported.jax(ids)
    theirs, present = _run(exported.session, ids)
    np.testing.assert_allclose(theirs, ours, **TOL)
    assert ours.std() > 1.0
    assert len(present) == 2 * exported.c.n_layers
    assert present[0].shape == (3, exported.c.n_kv_heads, 37, exported.c.head_dim)
    # causal: a prefix's logits do not depend on what follows (right padding is safe without a mask)
    np.testing.assert_allclose(_run(exported.session, ids[:1, :9])[0], theirs[:1, :9], atol=1e-5)


def test_cached_decoding_equals_uncached(exported):
    """A 20-token prompt, then one token at a time and a 12-token chunk through the returned cache: the logits
    of every step equal the logits of the whole sequence at once. (3 x 37 ids: the shape JAX compiled for
    test_graph_matches_jax.)"""
    ids = np.random.default_rng(1).integers(0, 256, (3, 37))
    whole, _ = _run(exported.session, ids)
    logits, past = _run(exported.session, ids[:, :20])
    steps = [logits]
    for start, stop in [(20, 21), (21, 22), (22, 23), (23, 24), (24, 25), (25, 37)]:
        logits, past = _run(exported.session, ids[:, start:stop], past=past)
        steps.append(logits)
        assert past[0].shape[2] == stop
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, **TOL)
    np.testing.assert_allclose(whole, exported.jax(ids), **TOL)


def test_left_padded_batch_with_mask(exported):
    """Rows of 30, 17 and 5 tokens left-padded into one batch: with the mask, each row's real positions give
    its logits alone, in the prompt and in a cached decoding step after it."""
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 256, n) for n in (30, 17, 5)]
    nxt = rng.integers(0, 256, (3, 1))
    width = max(len(r) for r in rows)
    ids = np.zeros((3, width), np.int64)  # pad id 0: a real token id too, so only the mask can hide it
    mask = np.zeros((3, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    logits, past = _run(exported.session, ids, mask)
    step, _ = _run(exported.session, nxt, np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1), past)
    # Each row alone, then its next token, right-padded to 3 x 37 (one JAX compile, shared with the tests above):
    # JAX's attention is causal, so the padding after a row does not reach its real positions.
    right = np.zeros((3, 37), np.int64)
    for i, r in enumerate(rows):
        right[i, :len(r) + 1] = np.concatenate([r, nxt[i]])
    right = exported.jax(right)
    for i, r in enumerate(rows):
        alone = right[i, :len(r) + 1]
        np.testing.assert_allclose(logits[i, width - len(r):], alone[:-1], **TOL)
        np.testing.assert_allclose(step[i, 0], alone[-1], **TOL)
    # without the mask the padded rows differ: the mask is what makes them right
    unmasked, _ = _run(exported.session, ids)
    assert np.abs(unmasked[2, -5:] - logits[2, -5:]).max() > 1e-2


def test_external_data_file(exported):
    """Past the protobuf limit the weights move to model.onnx.data; forced for the multi-head variant with a zero
    threshold (the graph tests above ran on its files, and their logits matched JAX)."""
    if exported.c.n_heads != exported.c.n_kv_heads:
        assert not (exported.out / onnx_io.DATA_FILE).exists()
        return
    out = exported.out
    assert sorted(p.name for p in out.iterdir()) == [".kslm_export.json", "model.onnx", onnx_io.DATA_FILE, "tokenizer.model"]
    weight_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(exported.params))
    inline = [len(t.raw_data) for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer]
    assert max(inline) < 4096  # only norms and constants stay in the protobuf, every matrix moved out
    assert (out / onnx_io.DATA_FILE).stat().st_size + sum(inline) >= weight_bytes
