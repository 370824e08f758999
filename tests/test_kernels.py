"""The speed levers against their reference paths: tokamax attention, SwiGLU and RMSNorm, the fused linear +
cross-entropy, FP8 matmuls and the partly unrolled layer scan. On CPU tokamax runs its XLA reference kernels;
on a GPU the same tests run its Pallas kernels (Mosaic GPU / Triton), which is the GPU correctness check."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params
from extras import needs

from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import attention, fp8, llama
from kslm_jax.train import step as step_lib

CFG = llama.ModelConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
GPU = jax.default_backend() == "gpu"
# Two packed rows: documents of 50 and 70 tokens then 8 of padding; three documents filling the row.
SEG = np.array([[1] * 50 + [2] * 70 + [0] * 8, [1] * 20 + [2] * 30 + [3] * 78])
POS = np.array([list(range(50)) + list(range(70)) + [0] * 8, list(range(20)) + list(range(30)) + list(range(78))])
VALID = SEG > 0


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """float32 references in full precision: a GPU would otherwise run them in TF32 (1e-3 relative)."""
    with jax.default_matmul_precision("highest"):
        yield


def test_document_starts():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(attention.document_starts(seg), [[0, 0, 0, 3, 3, 5, 6, 6], [0] * 8])
    # The mask they stand for (short rows' fallback) is the reference's on every real token.
    pos = jnp.asarray([[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
    valid = np.asarray(seg) > 0
    np.testing.assert_array_equal(np.asarray(attention.starts_mask(attention.document_starts(seg)))[valid],
                                  np.asarray(attention.packed_mask(pos, pos, seg, seg))[valid])


@needs("kernels", "tokamax")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", ["mosaic_gpu", "triton"] if GPU else ["xla"])
def test_tokamax_attention_matches_reference(kernel, causal):
    """Outputs and gradients (q, k, v) on the real tokens of packed rows with padding; causal (the decoder) and
    whole documents (the encoder, each query's [start, end) range)."""
    rng = np.random.default_rng(4)
    dtype = jnp.bfloat16 if GPU else jnp.float32
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((2, 128, 8, 64), (2, 128, 2, 64), (2, 128, 2, 64)))
    seg, pos = jnp.asarray(SEG), jnp.asarray(POS)
    mask = attention.prepare("xla", pos, seg, 8, causal)["mask"]
    ranges = attention.prepare("tokamax_triton", pos, seg, 8, causal)
    w = jnp.asarray(rng.standard_normal((2, 128, 8, 64)), jnp.float32) * VALID[:, :, None, None]

    def loss(f):
        return lambda q_, k_, v_: (f(q_, k_, v_).astype(jnp.float32) * w).sum()

    ours = lambda q_, k_, v_: attention.tokamax_attend(q_, k_, v_, ranges["k_start"], kernel, ranges.get("k_end"))
    ref = lambda q_, k_, v_: attention.reference(q_, k_, v_, mask)
    tol = 0.03 if GPU else 1e-4
    a, b = jax.jit(ours)(q, k, v).astype(jnp.float32), jax.jit(ref)(q, k, v).astype(jnp.float32)
    assert bool(jnp.isfinite(a).all())
    assert float(jnp.abs(a - b)[VALID].max()) < tol
    grads = [jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v) for f in (ours, ref)]
    for ga, gb in zip(*grads):
        ga, gb = ga.astype(jnp.float32), gb.astype(jnp.float32)
        assert float(jnp.linalg.norm(ga - gb) / jnp.linalg.norm(gb)) < (0.02 if GPU else 1e-4)


def _packed_batch(c, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, c.vocab_size, SEG.shape)
    return jnp.asarray(tokens), jnp.asarray(POS), jnp.asarray(SEG)


def _loss_and_grads(c, params, batch):
    tokens, pos, seg = batch
    model = llama.Transformer(c)

    def loss(p):
        logits = model.apply({"params": p}, tokens, pos, seg).astype(jnp.float32)
        ce, _ = step_lib.token_losses(logits[:, :-1], tokens[:, 1:], seg[:, 1:] > 0)
        return ce.sum() / (seg[:, 1:] > 0).sum()
    return jax.jit(jax.value_and_grad(loss))(params)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@needs("kernels", "tokamax")
def test_tokamax_glu_and_norm_match_xla_model():
    """model.kernels=tokamax keeps the parameter tree and computes the same loss and gradients."""
    c = dataclasses.replace(CFG, n_layers=1, dtype="bfloat16" if GPU else "float32")
    _, params = init_params(c)
    fused = dataclasses.replace(c, kernels="tokamax")
    shapes = jax.eval_shape(llama.Transformer(fused).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert jax.tree.map(jnp.shape, nn.unbox(shapes["params"])) == jax.tree.map(jnp.shape, params)
    batch = _packed_batch(c)
    (la, ga), (lb, gb) = _loss_and_grads(fused, params, batch), _loss_and_grads(c, params, batch)
    tol = 2e-2 if GPU else 1e-5
    assert abs(float(la) - float(lb)) < tol * float(lb)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert _rel(x, y) < (5e-2 if GPU else 1e-4)


def _logits(c, params, batch):
    return jax.jit(llama.Transformer(c).apply)({"params": params}, *batch).astype(jnp.float32)


def test_scan_unroll_keeps_the_math():
    """Two layers per scan iteration (3 layers: a remainder iteration too) equal one layer per iteration;
    the parameters are the same tree (lax.scan's unroll changes the loop, not what it computes)."""
    _, params = init_params(CFG)
    batch = _packed_batch(CFG)
    unrolled = dataclasses.replace(CFG, scan_unroll=2)
    assert _rel(_logits(unrolled, params, batch), _logits(CFG, params, batch)) < 1e-6
    # ...and the key reaches the loop: its scan runs 2 layers per iteration, the default 1.
    jaxpr = lambda c: str(jax.make_jaxpr(llama.Transformer(c).apply)({"params": params}, *batch))
    assert "unroll=2" in jaxpr(unrolled) and "unroll=2" not in jaxpr(CFG)


def test_fp8_dot_rounds_operands_and_gradient():
    """A Linear-shaped contraction (two input axes) equals the float32 product of the e4m3-rounded operands
    times their scales; its gradients use the e5m2-rounded incoming gradient."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 8, 2, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 32, 48)) * 0.05, jnp.float32)
    dims = (((2, 3), (0, 1)), ((), ()))
    y = fp8.dot_general(x, w, dims)
    exact = jax.lax.dot_general(x, w, dims)
    # e4m3 keeps 3 mantissa bits: a few percent per product, averaged down over the 64-term sums.
    assert 1e-3 < _rel(y, exact) < 0.05
    x2, w2 = x.reshape(32, 64), w.reshape(64, 48)
    (xq, sx), (wq, sw) = fp8.quantize(x2, fp8.E4M3), fp8.quantize(w2, fp8.E4M3)
    f32 = lambda a: a.astype(jnp.float32)
    np.testing.assert_allclose(y.reshape(32, 48), f32(xq) @ f32(wq) * sx * sw, rtol=1e-5, atol=1e-6)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = jax.grad(lambda x_, w_: (fp8.dot_general(x_, w_, dims) * g).sum(), (0, 1))(x, w)
    gq, sg = fp8.quantize(g.reshape(32, 48), fp8.E5M2)
    assert 0 < _rel(f32(gq) * sg, g.reshape(32, 48)) < 0.15   # e5m2: 2 mantissa bits
    np.testing.assert_allclose(dx.reshape(32, 64), f32(gq) @ f32(wq).T * sg * sw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw.reshape(64, 48), f32(xq).T @ f32(gq) * sx * sg, rtol=1e-5, atol=1e-6)


def test_fp8_model_stays_near_default():
    """Every projection in FP8: logits within a few percent of the default path's, not equal to them."""
    _, params = init_params(CFG)
    batch = _packed_batch(CFG)
    fp8_cfg = dataclasses.replace(CFG, matmul_precision="fp8")
    logits = _logits(fp8_cfg, params, batch)
    assert 1e-4 < _rel(logits, _logits(CFG, params, batch)) < 0.1
    # The output projection stays in the compute dtype: the logits are the FP8 blocks' final states times lm_head.
    hidden = llama.Transformer(fp8_cfg).apply({"params": params}, *batch, return_hidden=True)
    np.testing.assert_allclose(logits, hidden @ params["lm_head"]["kernel"], rtol=1e-5, atol=1e-5)


@needs("kernels", "jax_cce")
def test_cce_loss_matches_dense():
    """Summed CE over counted tokens and its gradients (hidden states and output kernel), padding included."""
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.standard_normal((2, 128, 32)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((32, 300)) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 128)))
    mask = jnp.asarray(VALID)

    def dense(h, w):
        ce, _ = step_lib.token_losses(jnp.einsum("btd,dv->btv", h, w), targets, mask)
        return ce.sum()

    def fused(h, w):
        return step_lib.cce_loss_sum(h, w, targets, mask)

    (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, kernel) for f in (fused, dense))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for a, b in zip(ga, gb):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("overrides,words", [
    (["train.loss_impl=cce"], ["train.z_loss", "train.loss_impl=cce"]),
    (["lora.rank=4", "finetune.kind=sft", "model.kernels=tokamax"], ["model.kernels", "LoRA"]),
    (["finetune.kind=sft", "model.matmul_precision=fp8_delayed"], ["model.matmul_precision=fp8_delayed", "=fp8"]),
    (["model.fp8_amax_history=0"], ["model.fp8_amax_history=0", "at least 1"]),
])
def test_config_refuses_levers_that_change_the_math(overrides, words):
    cfg = config_lib.load(None)
    for item in overrides:
        config_lib.apply_override(cfg, item)
    with pytest.raises(KslmError) as e:
        config_lib.validate(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)
