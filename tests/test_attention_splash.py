"""Pallas Splash attention (the TPU kernel) in interpret mode on CPU equals the reference attention on packed rows
with padding and grouped-query heads: outputs and gradients, float32 and bfloat16, on one device and sharded
over batch and heads through shard_map.

Tolerances: float32 outputs 1e-5 absolute and gradients 1e-4 relative to their largest entry (the kernel's
online softmax sums in another order); bfloat16 2e-2 and 3e-2 (bf16 has 8 mantissa bits; both sides round
probabilities to bf16 before the value matmul).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from kslm_jax.model import attention

B, T, N, K, H = 2, 256, 4, 2, 32
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 3e-2)}


def _packed():
    """Row 0: documents of 100, 100 and 40 tokens, then 16 padding; row 1: 60 and 170, then 26 padding."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b, lengths in enumerate([(100, 100, 40), (60, 170)]):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start:start + n] = i + 1
            pos[b, start:start + n] = np.arange(n)
            start += n
        pos[b, start:] = np.arange(T - start)
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(dtype):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)).astype(dtype), jax.random.normal(ks[1], (B, T, K, H)).astype(dtype),
            jax.random.normal(ks[2], (B, T, K, H)).astype(dtype))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # 128-token tiles: rows span 2 x 2 blocks, so documents cross tile boundaries and some blocks are skipped
    monkeypatch.setattr(attention, "SPLASH_BLOCK", 128)


def _check(dtype, run, causal=True):
    seg, pos = _packed()
    q, k, v = _qkv(dtype)
    mask = attention.packed_mask(pos, pos, seg, seg, causal)
    w = jax.random.normal(jax.random.PRNGKey(1), (B, T, N, H))   # a loss that weighs every output differently

    def ref_loss(q, k, v):
        return jnp.sum(attention.reference(q, k, v, mask).astype(jnp.float32) * w)

    def splash_loss(q, k, v):
        return jnp.sum(run(q, k, v, seg).astype(jnp.float32) * w)

    out_tol, grad_tol = TOL[dtype]
    ref, got = attention.reference(q, k, v, mask), run(q, k, v, seg)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=out_tol)
    for g_ref, g_got in zip(jax.grad(ref_loss, (0, 1, 2))(q, k, v), jax.grad(splash_loss, (0, 1, 2))(q, k, v)):
        g_ref, g_got = np.asarray(g_ref, np.float32), np.asarray(g_got, np.float32)
        assert np.abs(g_got - g_ref).max() <= grad_tol * np.abs(g_ref).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_interpret_matches_reference(dtype):
    _check(dtype, lambda q, k, v, seg: attention.splash(q, k, v, seg, interpret=True))


def test_splash_whole_documents_match_reference():
    """The encoder's form (model.arch=encoder): a full mask, documents kept apart by the segment ids alone
    (outputs; the backward pass is the causal tests' kernel under another mask)."""
    seg, pos = _packed()
    q, k, v = _qkv(jnp.float32)
    ref = attention.reference(q, k, v, attention.packed_mask(pos, pos, seg, seg, causal=False))
    got = attention.splash(q, k, v, seg, interpret=True, causal=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=TOL[jnp.float32][0])


def test_splash_sharded_over_batch_and_heads_matches_reference():
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])

    @jax.jit
    def run(q, k, v, seg):
        return attention.splash(q, k, v, seg, interpret=True)

    with jax.set_mesh(mesh):
        _check(jnp.float32, run)
        lowered = run.lower(*_qkv(jnp.float32), _packed()[0]).as_text()
    assert "shard_map" in lowered or "manual" in lowered   # the kernel ran per shard, not on gathered arrays


def test_auto_is_xla_on_cpu_and_short_rows_take_the_reference():
    assert attention.resolve("auto", jnp.bfloat16) == "xla"   # this machine is a CPU
    assert attention.resolve("splash") == "splash"
    seg, pos = _packed()
    q, k, v = (x[:, :8] for x in _qkv(jnp.float32))           # 8 tokens: not a multiple of 128 lanes
    mask = attention.packed_mask(pos[:, :8], pos[:, :8], seg[:, :8], seg[:, :8])
    np.testing.assert_allclose(attention.splash(q, k, v, seg[:, :8]), attention.reference(q, k, v, mask), atol=1e-6)
