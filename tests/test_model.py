"""The decoder: packing isolation, RoPE restart, scan vs unrolled, cached decoding, attention paths."""
import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_params
from extras import needs_gpu

from kslm_jax.eval import generate as gen
from kslm_jax.model import attention, llama
from kslm_jax.train import state as state_lib

CFG = llama.ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)


def _init(c=CFG, seed=0):
    return init_params(c, seed)


def test_packed_documents_do_not_see_each_other():
    """Two documents packed in one row give the same logits as each alone (mask + RoPE restart)."""
    model, params = _init()
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(0)
    a, b = rng.integers(4, 256, 11), rng.integers(4, 256, 7)
    row = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 11 + [2] * 7 + [0, 0]])
    pos = np.array([list(range(11)) + list(range(7)) + [0, 0]])
    packed = apply({"params": params}, row, pos, seg)
    alone_a = apply({"params": params}, a[None])
    alone_b = apply({"params": params}, b[None])
    np.testing.assert_allclose(packed[0, :11], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 11:18], alone_b[0], atol=1e-5)


def test_causal():
    model, params = _init()
    x = np.random.default_rng(1).integers(4, 256, (1, 12))
    y = x.copy()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    apply = jax.jit(model.apply)
    lx, ly = apply({"params": params}, x), apply({"params": params}, y)
    np.testing.assert_allclose(lx[0, :8], ly[0, :8], atol=1e-6)
    assert not np.allclose(lx[0, 8:], ly[0, 8:])


def test_scan_equals_unrolled():
    model, params = _init()
    c2 = dataclasses.replace(CFG, scan_layers=False)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(CFG.n_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    x = np.random.default_rng(2).integers(4, 256, (2, 10))
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x),
                               jax.jit(llama.Transformer(c2).apply)({"params": unrolled}, x), atol=1e-5)


def _random_draws(jaxpr) -> int:
    """random_bits equations in a jaxpr, nested loop bodies counted once."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("random_bits", "threefry2x32")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _random_draws(sub)
    return n


def test_unrolled_state_starts_from_its_scanned_twin():
    """An unrolled decoder's train state is drawn through the scanned twin: for one seed both layouts start
    from the same weights, and the init program's random draws do not grow with depth (a per-layer copy of
    them took over 70 s to compile on an H100 at 124M)."""
    def init(c):
        return state_lib.init_fn(llama.Transformer(c), optax.sgd(0.1), 3)

    scanned = jax.jit(lambda: nn.unbox(init(CFG)()))().params
    unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
    unrolled = jax.jit(lambda: nn.unbox(init(unrolled_cfg)()))().params
    assert "layers" not in unrolled
    partly = jax.jit(lambda: nn.unbox(init(dataclasses.replace(CFG, scan_unroll=3))()))().params
    jax.tree.map(np.testing.assert_array_equal, partly, scanned)
    for i in range(CFG.n_layers):
        jax.tree.map(lambda u, s: np.testing.assert_array_equal(u, s[i]), unrolled[f"layers_{i}"], scanned["layers"])
    np.testing.assert_array_equal(unrolled["embed_tokens"]["embedding"], scanned["embed_tokens"]["embedding"])
    draws = [_random_draws(jax.make_jaxpr(init(dataclasses.replace(unrolled_cfg, n_layers=n)))().jaxpr)
             for n in (2, 6)]
    assert draws[0] == draws[1] > 0


@pytest.mark.parametrize("remat,scan,tie", [("full", True, False), ("dots", False, True)])
def test_remat_matches_no_remat(remat, scan, tie):
    """Recomputing activations in the backward pass changes memory, not math: on packed rows the loss, logits
    and every gradient equal those without remat, and the gradient's program really holds the checkpoint."""
    base = dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=tie)
    plain, params = _init(base)
    assert ("lm_head" in params) != tie
    rematted = llama.Transformer(dataclasses.replace(base, remat=remat))
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, 256, (2, 16))
    seg = np.array([[1] * 9 + [2] * 5 + [0, 0], [1] * 16])
    pos = np.array([list(range(9)) + list(range(5)) + [0, 0], list(range(16))])

    def loss(model):
        def f(p):
            logits = model.apply({"params": p}, tokens, pos, seg)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
            same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
            return (nll * same).sum() / same.sum(), logits
        return f

    (want, want_logits), want_g = jax.jit(jax.value_and_grad(loss(plain), has_aux=True))(params)
    (got, got_logits), got_g = jax.jit(jax.value_and_grad(loss(rematted), has_aux=True))(params)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        assert np.abs(np.asarray(w)).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # What remat does: the gradient's program recomputes forward matmuls (attention's, at least) it did not keep.
    matmuls = [str(jax.make_jaxpr(jax.grad(lambda p, m=m: loss(m)(p)[0]))(params)).count("dot_general")
               for m in (plain, rematted)]
    assert matmuls[1] > matmuls[0], matmuls


def test_greedy_with_cache_equals_full_recompute():
    """21 prompt tokens: one prefill chunk of 16, then five one at a time, then 12 decoded."""
    model, params = _init()
    prompt = [2, *np.random.default_rng(4).integers(4, 250, 20).tolist()]
    assert len(prompt) == gen.PREFILL_CHUNK + 5
    cached = gen.generate_ids(model, params, prompt, max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0,
                              rng=jax.random.PRNGKey(0), vocab_limit=250, stop_id=None)
    seq = list(prompt)
    full = jax.jit(model.apply)
    for _ in range(12):
        # Padded to one length so it compiles once; causality makes the padding invisible.
        logits = full({"params": params}, jnp.asarray([seq + [0] * (40 - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1, :250])))
    assert cached == seq[len(prompt):]


def test_sampling_respects_top_k_and_vocab_limit():
    logits = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 100.0]])
    seen = {int(gen.sample(logits, jax.random.PRNGKey(i), 1.0, 1.0, top_k=2, vocab_limit=4)[0]) for i in range(50)}
    assert seen <= {0, 1} and seen == {0, 1}
    top_p = {int(gen.sample(logits, jax.random.PRNGKey(i), 1.0, 0.5, top_k=0, vocab_limit=4)[0]) for i in range(50)}
    assert top_p == {0}


def test_reference_attention_matches_dense_softmax():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    pos = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = np.asarray(attention.packed_mask(pos, pos, seg, seg))
    out = np.asarray(attention.reference(q, k, v, mask))
    for bi in range(2):
        for t in range(6):
            for n in range(4):
                kk, vv = k[bi, :, n // 2], v[bi, :, n // 2]
                s = kk @ q[bi, t, n] / np.sqrt(8)
                s = np.where(mask[bi, t], s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                np.testing.assert_allclose(out[bi, t, n], p @ vv, atol=1e-5)


def test_segment_layout():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    out = attention.segment_layout(seg, max_segments=4)
    np.testing.assert_array_equal(out["seqlen"], [[3, 2, 1, 2, -1], [8, -1, -1, -1, -1]])
    np.testing.assert_array_equal(out["offsets"], [[0, 3, 5, 6, -1, -1], [0, -1, -1, -1, -1, -1]])


@needs_gpu("cuDNN attention")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["cudnn", "cudnn_packed"])
def test_cudnn_matches_reference(impl, causal):
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((2, 128, 8, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 128, 2, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 128, 2, 64)), jnp.bfloat16)
    seg = jnp.asarray([[1] * 50 + [2] * 70 + [0] * 8, [1] * 20 + [2] * 30 + [3] * 78])
    pos = jnp.asarray([list(range(50)) + list(range(70)) + [0] * 8, list(range(20)) + list(range(30)) + list(range(78))])
    valid = np.asarray(seg) > 0
    ref_in = attention.prepare("xla", pos, seg, 8, causal)
    b = attention.reference(q, k, v, ref_in["mask"]).astype(jnp.float32)
    a = attention.attend(q, k, v, attention.prepare(impl, pos, seg, 8, causal), impl, causal).astype(jnp.float32)
    assert float(jnp.abs(a - b)[valid].max()) < 0.03
    assert bool(jnp.isfinite(a).all())
    # Gradients agree too, on the valid positions.
    f = lambda impl_, inputs: lambda q_: (attention.attend(q_, k, v, inputs, impl_, causal).astype(jnp.float32)
                                          * valid[:, :, None, None]).sum()
    ga = jax.grad(f(impl, attention.prepare(impl, pos, seg, 8, causal)))(q).astype(jnp.float32)
    gb = jax.grad(f("xla", ref_in))(q).astype(jnp.float32)
    assert float(jnp.abs(ga - gb).max()) < 0.05


def test_flops_per_token_counts_matmuls():
    c = CFG
    n_matmul = c.n_layers * (c.d_model * (4 * 16 + 2 * 2 * 16 + 4 * 16) + 3 * c.d_model * c.d_ff) + c.d_model * c.vocab_size
    assert abs(llama.flops_per_token(c, 64) - (6 * n_matmul + 12 * c.n_layers * 64 * 64)) < 6 * 1000
