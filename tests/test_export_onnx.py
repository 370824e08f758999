"""ONNX export: onnxruntime runs the graph and its logits match JAX, tied and untied, MHA and GQA, batched."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from kslm_jax.cli import commands
from kslm_jax.export import onnx_io
from kslm_jax.model import llama

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SENTENCES = ["대한민국의 주권은 국민에게 있고,", "이 법은 공포한 날부터 시행한다. 2024년 7월 ㅋㅋ",
             "국회는 법률에 저촉되지 아니하는 범위 안에서 의사와 내부규율에 관한 규칙을 제정할 수 있다."]


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(session, ids):
    return session.run(["logits"], {"input_ids": np.asarray(ids, np.int64)})[0]


def test_cli_export_runs_in_onnxruntime(trained_tiny, tmp_path):
    """`kslm export --format onnx` of a trained workdir; Korean sentences tokenized with the shipped tokenizer."""
    import sentencepiece as spm
    t = trained_tiny
    out = tmp_path / "onnx"
    commands.export(SimpleNamespace(workdir=str(t.workdir), format="onnx", quant=None, out=str(out)), [])
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.model"]
    model = onnx.load(str(out / "model.onnx"))
    assert model.opset_import[0].version >= 17
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    session = _session(out)
    forward = jax.jit(t.model.apply)
    for text in SENTENCES:
        ids = [sp.bos_id()] + sp.EncodeAsIds(text)
        assert ids[1:] == t.sp.EncodeAsIds(text)
        ours = np.asarray(forward({"params": t.params}, jnp.asarray([ids])))
        theirs = _run(session, [ids])
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


# (n_heads, n_kv_heads, tie): multi-head, grouped-query, multi-query; tied and untied output
VARIANTS = [(4, 4, False), (4, 2, True), (6, 1, False)]


@pytest.mark.parametrize("heads,kv,tie", VARIANTS)
def test_graph_matches_jax(tmp_path, heads, kv, tie):
    # Large weights give peaked attention and logits, so a layout mistake cannot hide in near-uniform output.
    c = llama.ModelConfig(vocab_size=256, d_model=48, n_layers=2, n_heads=heads, n_kv_heads=kv, head_dim=8,
                          d_ff=64, tie_embeddings=tie, rope_theta=500.0)
    model, params = random_params(c, seed=heads * 10 + kv, std=0.3)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"stand-in: the graph test does not tokenize")
    out = onnx_io.write_onnx(params, c, tok, tmp_path / "onnx")
    ids = np.random.default_rng(0).integers(0, 256, (3, 37))
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    session = _session(out)
    theirs = _run(session, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert ours.std() > 1.0
    # causal: a prefix's logits do not depend on what follows (right padding is safe)
    np.testing.assert_allclose(_run(session, ids[:1, :9]), theirs[:1, :9], atol=1e-5)


def test_external_data_file(tmp_path):
    """Past the protobuf limit the weights move to model.onnx.data; forced here with a zero threshold."""
    c = llama.ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    model, params = random_params(c, std=0.3)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    out = onnx_io.write_onnx(params, c, tok, tmp_path / "onnx", external_over=0)
    assert (out / onnx_io.DATA_FILE).stat().st_size > (out / "model.onnx").stat().st_size
    ids = np.arange(20)[None] % 128
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(_run(_session(out), ids), ours, atol=1e-4, rtol=1e-4)
