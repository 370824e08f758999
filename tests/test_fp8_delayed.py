"""Delayed-scaling FP8 (model.matmul_precision=fp8_delayed): Flax's scales and amax histories live in the train
state, the step overwrites them with what this step saw, gradient accumulation records what one big batch would,
a resumed run carries them on, and a model applied with its parameters alone falls back to current scaling."""
import dataclasses
import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import copy_without_clean, init_params

from kslm_jax.core import config as config_lib
from kslm_jax.core import sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.model import fp8, llama
from kslm_jax.objectives import lm
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib

HISTORY = 4
CFG = llama.ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                        matmul_precision="fp8_delayed", fp8_amax_history=HISTORY)
E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
PROJ = ("self_attn", "q_proj", "fp8")


def _batch(rows=4, t=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, CFG.vocab_size, (rows, t + 1)).astype(np.int32)
    seg = np.ones((rows, t), np.int32)
    seg[1, 10:] = 0  # padding: not counted by the loss, still seen by the projections
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos, "segment_ids": seg}


def _q_input_amax(params, inputs):
    """max |x| of the input of layer 0's q_proj, computed directly: the normed token embeddings."""
    emb = params["embed_tokens"]["embedding"][inputs]
    scale = params["layers"]["input_layernorm"]["scale"][0]
    x = emb * jax.lax.rsqrt(jnp.mean(emb * emb, -1, keepdims=True) + CFG.norm_eps) * scale
    return float(jnp.abs(x).max())


def _q_meta(state):
    m = state.fp8_meta["layers"]
    for k in PROJ:
        m = m[k]
    return jax.tree.map(lambda a: np.asarray(a[0]), m)  # layer 0


@functools.cache
def _setup():
    model = llama.Transformer(CFG)
    tx = optax.adam(1e-2)
    state = jax.jit(lambda: nn.unbox(state_lib.init_fn(model, tx, 0)()))()
    step = jax.jit(functools.partial(step_lib.train_step, loss=step_lib.lm_loss(model, 0.0), tx=tx,
                                     lr_fn=lambda c: 1e-2, accum=1))
    states, losses = [state], []
    for _ in range(6):
        state, metrics = step(states[-1], _batch())
        states.append(state)
        losses.append(float(metrics["ce_sum"] / metrics["tokens"]))
    return model, step, states, losses


def test_step_updates_scales_and_histories_from_what_it_saw():
    _, step, states, losses = _setup()
    s0, s1, s2 = states[:3]
    inputs = _batch()["inputs"]
    m0, m1, m2 = map(_q_meta, (s0, s1, s2))
    assert not m0["input_amax_history"].any() and (m0["input_scale"] == 1).all()
    # Step 1 casts at scale 1 (its histories were empty) and records this step's amaxes as the newest entry.
    np.testing.assert_allclose(m1["input_amax_history"][0], _q_input_amax(s0.params, inputs), rtol=1e-6)
    kernel0 = s0.params["layers"]["self_attn"]["q_proj"]["kernel"][0]
    np.testing.assert_allclose(m1["kernel_amax_history"][0], float(jnp.abs(kernel0).max()), rtol=1e-6)
    assert m1["output_grad_amax_history"][0] > 0 and not m1["input_amax_history"][1:].any()
    assert (m1["input_scale"] == 1).all()
    # Step 2 scales by the largest amax of the history it was given, then rolls this step's amax in.
    np.testing.assert_allclose(m2["input_scale"], m1["input_amax_history"].max() / E4M3_MAX, rtol=1e-6)
    np.testing.assert_allclose(m2["kernel_scale"], m1["kernel_amax_history"].max() / E4M3_MAX, rtol=1e-6)
    np.testing.assert_allclose(m2["input_amax_history"][0], _q_input_amax(s1.params, inputs), rtol=1e-6)
    assert m2["input_amax_history"][-1] == m1["input_amax_history"][0]
    # Every projection of every layer has its own meta, all moved; after 6 steps the 4-entry histories are full.
    for a, b in zip(jax.tree.leaves(s0.fp8_meta), jax.tree.leaves(states[-1].fp8_meta)):
        assert a.shape[0] == CFG.n_layers and not np.array_equal(a, b)
    assert all(np.asarray(h).all() for h in jax.tree.leaves(states[-1].fp8_meta) if h.shape[-1] == HISTORY)
    assert losses[-1] < losses[0] - 0.3, losses
    # The optimizer sees the parameters alone.
    assert jax.tree.structure(s1.opt_state[0].mu) == jax.tree.structure(s1.params)


def test_nonfinite_step_keeps_the_old_meta():
    _, step, states, _ = _setup()
    s = states[2]
    bad = s.replace(params={**s.params, "embed_tokens": {"embedding": s.params["embed_tokens"]["embedding"] * np.nan}})
    new, metrics = step(bad, _batch())
    assert int(metrics["nonfinite"]) == 1
    jax.tree.map(np.testing.assert_array_equal, new.fp8_meta, s.fp8_meta)


def test_accumulation_records_the_one_big_batch_meta():
    """Two micro-batches: the parameters' gradient and the new meta equal one batch's (the meta is the
    elementwise maximum of the micro-batches', not their sum); each half alone saw a smaller input amax."""
    model, _, states, _ = _setup()
    state, batch = states[1], _batch()
    halves = jax.tree.map(lambda v: v.reshape(2, v.shape[0] // 2, *v.shape[1:]), batch)
    run = jax.jit(step_lib.accumulate_with_meta, static_argnames=("loss", "accum"))
    loss = step_lib.lm_loss(model, 0.0)
    g1, _, meta1 = run(loss, state.params, state.fp8_meta, None, batch, jax.random.PRNGKey(0), accum=1)
    g2, _, meta2 = run(loss, state.params, state.fp8_meta, None, halves, jax.random.PRNGKey(0), accum=2)
    # On a CPU the float8 products are computed exactly in float32, so the two differ by summation order only.
    # A Hopper GPU runs real FP8 GEMMs whose rounding follows the tiling of each shape: measured on an H100,
    # the halves' sum was up to 4.3% of the largest gradient entry away from one batch's. Summing the
    # micro-batches' means instead of dividing their sum once would give twice one batch's gradient.
    tol = 1e-5 if jax.default_backend() == "cpu" else 0.1
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        assert float(jnp.abs(a - b).max()) <= tol * float(jnp.abs(b).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), meta2, meta1)
    part = [_q_input_amax(state.params, h) for h in halves["inputs"]]
    newest = meta2["layers"]["self_attn"]["q_proj"]["fp8"]["input_amax_history"][0, 0]
    assert part[0] != part[1] and np.isclose(newest, max(part), rtol=1e-6)


def test_model_without_the_meta_uses_current_scaling():
    """Eval, sampling and export apply the params alone: the FP8 projections then scale each tensor by its own
    amax, exactly the `fp8` path, near the default path's logits; with the meta the logits are near them too."""
    states = _setup()[2]
    params, meta = states[3].params, states[3].fp8_meta
    batch = _batch()
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = jax.jit(llama.Transformer(CFG).apply)({"params": params}, *args)
    current = jax.jit(llama.Transformer(dataclasses.replace(CFG, matmul_precision="fp8")).apply)({"params": params},
                                                                                                   *args)
    np.testing.assert_array_equal(logits, current)
    exact = jax.jit(llama.Transformer(dataclasses.replace(CFG, matmul_precision="default")).apply)(
        {"params": params}, *args)
    rel = lambda a: float(jnp.linalg.norm(a - exact) / jnp.linalg.norm(exact))  # noqa: E731
    with_meta = jax.jit(llama.Transformer(CFG).apply)({"params": params, fp8.META: meta}, *args)
    assert 1e-4 < rel(logits) < 0.1 and 1e-4 < rel(with_meta) < 0.1


def test_unrolled_state_splits_the_meta_per_layer():
    """The unrolled decoder is drawn through its scanned twin: its meta is the twin's, one entry per layer."""
    unrolled = llama.Transformer(dataclasses.replace(CFG, scan_layers=False))
    shapes = jax.eval_shape(state_lib.init_fn(unrolled, optax.adam(1e-2), 0)).fp8_meta
    assert sorted(shapes) == [f"layers_{i}" for i in range(CFG.n_layers)]
    scanned = jax.eval_shape(state_lib.init_fn(llama.Transformer(CFG), optax.adam(1e-2), 0)).fp8_meta["layers"]
    for i in range(CFG.n_layers):
        assert jax.tree.map(lambda a: (a.shape[1:], a.dtype), scanned) == jax.tree.map(
            lambda a: (a.shape, a.dtype), shapes[f"layers_{i}"])
    _, plain = init_params(dataclasses.replace(CFG, matmul_precision="default"))
    assert "fp8" not in str(jax.tree_util.tree_structure(plain))


def test_imported_or_pruned_weights_start_with_fresh_meta():
    """kslm import and kslm prune write a step 0 of weights from elsewhere: its meta is a new run's."""
    mesh = sharding.make_mesh(config_lib.load(None, ["mesh.data=1"]).mesh)
    model, _, states, _ = _setup()
    _, shardings = state_lib.abstract_and_shardings(model, optax.adam(1e-2), 0, mesh)
    fresh = state_lib.fresh_fp8_meta(model, mesh, shardings)
    jax.tree.map(np.testing.assert_array_equal, fresh, states[0].fp8_meta)
    plain = llama.Transformer(dataclasses.replace(CFG, matmul_precision="fp8"))
    assert state_lib.fresh_fp8_meta(plain, mesh, shardings) == {}


def test_resume_continues_with_the_same_meta_and_losses(prepared, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed: steps 3 and 4 have the uninterrupted run's losses,
    and it ends with the same meta (a restore that dropped the histories would cast at other scales)."""
    wd = copy_without_clean(prepared, tmp_path / "run")
    over = ["model.matmul_precision=fp8_delayed", "model.fp8_amax_history=8", "train.steps=4",
            "checkpoint.every_steps=2", "train.eval_batches=1"]

    def fit():
        trainer = lm.trainer(workdir_lib.config_for(wd, None, over, force=True), wd)
        summary = trainer.fit()
        return summary["losses"], jax.tree.map(np.asarray, trainer.state.fp8_meta)

    losses, meta = fit()
    histories = [h for h in jax.tree.leaves(meta) if h.shape[-1] == 8]
    assert histories and all((np.count_nonzero(h, axis=-1) == 4).all() for h in histories)  # one entry a step
    shutil.rmtree(wd / "checkpoints" / "4")
    resumed, meta_again = fit()
    assert sorted(resumed) == [3, 4] and all(resumed[s] == losses[s] for s in (3, 4)), (resumed, losses)
    jax.tree.map(np.testing.assert_array_equal, meta_again, meta)
