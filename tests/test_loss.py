"""The chunked cross-entropy path gives the loss and gradients of the plain path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params

from kslm_jax.model import llama
from kslm_jax.train import step

C = llama.ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_matches_full(tie):
    import dataclasses
    c = dataclasses.replace(C, tie_embeddings=tie)
    model, params = init_params(c)
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 10 + [2] * 18 + [0] * 4, [1] * 32])
    pos = np.array([list(range(10)) + list(range(18)) + [0] * 4, list(range(32))])
    batch = {"inputs": rng.integers(4, 256, (2, 32)), "targets": rng.integers(4, 256, (2, 32)),
             "positions": pos, "segment_ids": seg}
    full = jax.jit(jax.value_and_grad(lambda p: step.loss_fn(p, model, batch, 1e-3)[0]))
    chunked = jax.jit(jax.value_and_grad(lambda p: step.loss_fn(p, model, batch, 1e-3, loss_chunk=8)[0]))
    (la, ga), (lb, gb) = full(params), chunked(params)
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_losses_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 3))
    mask = np.array([[True, True, False], [True, False, False]])
    ce, z = step.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=0.5)
    lse = np.log(np.exp(logits).sum(-1))
    want = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, np.where(mask, want, 0), rtol=1e-5)
    np.testing.assert_allclose(z, np.where(mask, 0.5 * lse ** 2, 0), rtol=1e-5)
