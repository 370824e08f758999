"""Token-weighted gradient accumulation: for every objective, k micro-batches give exactly the gradient of one
big batch, however unevenly the real tokens fall across them, on one device and on a 2 x 2 mesh."""
import functools
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest

from kslm_jax.core import config as config_lib
from kslm_jax.core import sharding
from kslm_jax.model import classify, llama, lora
from kslm_jax.objectives import distill, finetune, finetune_io, lm, student
from kslm_jax.train import step as step_lib

B, T, V, M = 16, 32, 96, 4
# Real tokens per row: micro-batches of 4 rows hold 122, 3, 94 and 1 of them, of 8 rows 125 and 95.
LENGTHS = [32, 30, 31, 29, 2, 1, 0, 0, 32, 3, 31, 28, 0, 0, 1, 0]
_OVR = [f"tokenizer.vocab_size={V}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.dtype=float32", "data.seq_len=32", "mesh.data=1"]


def _cfg(*extra):
    return config_lib.load(None, [*_OVR, *extra])


def _batch(seed=0, cls=False):
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for r, n in enumerate(LENGTHS):
        seg[r, :n] = 1
        seg[r, n // 2:n] = 2 if n > 4 else 1  # two packed documents in the longer rows
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        for s in (1, 2):
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx))
    batch = {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
             "targets": rng.integers(0, V, (B, T)).astype(np.int32), "positions": pos, "segment_ids": seg,
             "loss_mask": (rng.random((B, T)) < 0.6).astype(np.int32)}  # SFT: only the answers count
    if cls:  # up to M examples per row, each classified at its last position; label -1 marks no example
        index = np.zeros((B, M), np.int32)
        label = -np.ones((B, M), np.int32)
        for r, n in enumerate(LENGTHS):
            for j in range(min(n // 8, M)):
                index[r, j], label[r, j] = 8 * j + 7, rng.integers(0, 3)
        batch.update(cls_index=index, cls_label=label)
    return batch


def _split(batch, k):
    return {key: v.reshape(k, v.shape[0] // k, *v.shape[1:]) if k > 1 else v for key, v in batch.items()}


@jax.jit  # one compile; drawn op by op, these small arrays took 1.3 s of compiling on 2 cores
def _lora_params(base):
    adapters = lora.init(jax.random.PRNGKey(3), base, ["q_proj", "v_proj", "down_proj"], 4)
    # B starts at zero; a random B gives A a gradient too
    return {"adapters": jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(jax.tree_util.keystr(p))), x.shape)
        if "lora_b" in jax.tree_util.keystr(p) else x, adapters)}


NAMES = ("lm", "sft", "sft_lora", "cls", "distill_forward_kl_top0", "distill_jsd_top16", "distill_cached")


@functools.cache
def _objectives():
    """(name, loss, params, extra, batch) for every objective's loss as its module builds it. Built on first use,
    not at import: collection imports this module in every xdist worker. Student and teacher share one
    compiled model.init, and the teacher's logits one jit: compiling init twice and running the teacher op by op
    took 4 s of the 8 that building them took on 2 cores."""
    cfg = _cfg("train.z_loss=1e-3")
    c = llama.ModelConfig.from_config(cfg)
    model = teacher_model = llama.Transformer(c)
    init = jax.jit(model.init)
    params, teacher = (nn.unbox(init(jax.random.PRNGKey(seed), np.zeros((1, 8), np.int32))["params"])
                       for seed in (0, 1))
    ft = SimpleNamespace(train=cfg.train, lora=SimpleNamespace(rank=0, alpha=8.0, dropout=0.0), model=cfg.model,
                         finetune=cfg.finetune)
    lo = SimpleNamespace(train=cfg.train, lora=SimpleNamespace(rank=4, alpha=8.0, dropout=0.0))
    head = jax.tree.map(np.asarray, classify.init_head(jax.random.PRNGKey(2), c.d_model, 3))
    plain = {k: v for k, v in _batch().items() if k != "loss_mask"}
    out = [("lm", lm.loss(model, 1e-3, loss_chunk=8), params, None, plain),
           ("sft", finetune.sft_loss(model, ft), {"model": params}, None, _batch()),
           ("sft_lora", finetune.sft_loss(model, lo), _lora_params(params), {"base": params}, _batch()),
           ("cls", finetune.cls_loss(model, ft), {"model": params, "head": head}, None, _batch(cls=True))]
    for kind, topk in (("forward_kl", 0), ("jsd", 16)):
        dcfg = _cfg("train.z_loss=1e-3", "distill.teacher=x", f"distill.topk={topk}", f"distill.loss={kind}",
                    "distill.alpha=0.3", "distill.temperature=2.0")
        out.append((f"distill_{kind}_top{topk}", student.distill_loss(model, dcfg, teacher_model), params,
                    {"teacher": teacher}, plain))
    cached = dict(plain)  # the offline cache: the teacher's top-k ride in the batch
    logits = jax.jit(teacher_model.apply)({"params": teacher}, plain["inputs"], plain["positions"],
                                          plain["segment_ids"])
    logp, ids = distill.teacher_topk(logits[..., :V], 16)  # the cache holds real tokens, not vocabulary padding
    cached.update(teacher_logp=np.asarray(logp), teacher_ids=np.asarray(ids))
    dcfg = _cfg("distill.cache=c", "distill.topk=16", "distill.alpha=0.5")
    out.append(("distill_cached", student.distill_loss(model, dcfg), params, None, cached))
    assert tuple(o[0] for o in out) == NAMES
    return out


def _objective(name):
    return next(o for o in _objectives() if o[0] == name)


_accumulate = jax.jit(step_lib.accumulate, static_argnames=("loss", "accum"))


def _grads(loss, params, extra, batch, k):
    return _accumulate(loss, params, extra, _split(batch, k), jax.random.PRNGKey(0), k)


def _alone(batch, i, k):
    """`batch` with only micro-batch i of k real: the others' tokens and examples masked out, so the k-step
    program divides micro-batch i's gradient by its own count (its mean), without compiling a smaller shape."""
    rows = len(batch["segment_ids"])
    keep = (np.arange(rows) // (rows // k) == i)[:, None]
    out = dict(batch)
    for key, empty in (("segment_ids", 0), ("loss_mask", 0), ("cls_label", -1)):
        if key in out:
            out[key] = np.where(keep, out[key], empty)
    return out


def _close(a, b, tol=1e-6):
    """Every leaf of gradient tree `a` equals `b` to `tol` relative to the largest entry of the leaf."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.abs(y).max(), 1e-30)
        assert np.abs(x - y).max() <= tol * scale, np.abs(x - y).max() / scale


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_gives_the_one_big_batch_gradient(name):
    _, loss, params, extra, batch = _objective(name)
    g1, aux1 = _grads(loss, params, extra, batch, 1)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(g1)) > 1e-4
    for k in (2, 4):
        gk, auxk = _grads(loss, params, extra, batch, k)
        assert int(auxk["tokens"]) == int(aux1["tokens"])
        _close(gk, g1)
    if name not in ("lm", "sft", "cls"):  # one objective per normalizer (tokens, masked tokens, examples) is enough
        return
    # What the old step computed, the mean of per-micro-batch means, is far off on this batch.
    parts = [_grads(loss, params, extra, _alone(batch, i, 4), 4) for i in range(4)]
    old = jax.tree.map(lambda *g: sum(g) / 4, *[g for g, _ in parts])
    off = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))
              for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(g1)))
    assert off > 0.05


def test_accumulation_on_a_2x2_mesh_matches_one_device():
    """Parameters sharded over fsdp, the batch over data and fsdp: the same gradient as one device, without
    accumulation and with 4 micro-batches (k = 2 is checked on one device above; each k here is a compile)."""
    cfg = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "mesh.rules=fsdp")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    rules = sharding.rules(cfg.mesh.rules)
    c = llama.ModelConfig.from_config(cfg)
    _, dec = finetune_io.decoder_shapes(llama.Transformer(c), mesh, rules)
    rep = sharding.replicated(mesh)

    def place(tree):  # decoders (the student, a frozen base, a teacher) sharded as in training; the rest replicated
        if isinstance(tree, dict) and "embed_tokens" in tree:
            return jax.device_put(tree, dec)
        if isinstance(tree, dict):
            return {k: place(v) for k, v in tree.items()}
        return tree if tree is None else jax.device_put(tree, rep)
    for name in ("lm", "sft_lora", "cls", "distill_forward_kl_top0"):
        _, loss, params, extra, batch = _objective(name)
        want, _ = _grads(loss, params, extra, batch, 1)
        params, extra = place(params), place(extra)
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves((params, extra)))
        for k in (1, 4):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                gb = sharding.global_batch(batch, mesh, k)
                got, _ = _accumulate(loss, params, extra, gb, jax.random.PRNGKey(0), k)
            _close(got, want)


def test_lora_dropout_masks_differ_across_micro_batches_and_repeat_for_the_same_key():
    """One batch twice as two micro-batches: with the same masks its gradient would be the single batch's."""
    _, _, params, extra, _ = _objective("sft_lora")
    c = llama.ModelConfig.from_config(_cfg())
    model = llama.Transformer(c)
    drop = SimpleNamespace(train=_cfg().train, lora=SimpleNamespace(rank=4, alpha=8.0, dropout=0.5))
    loss = finetune.sft_loss(model, drop)
    half = jax.tree.map(lambda v: v[:4], _batch())
    twice = jax.tree.map(lambda v: np.concatenate([v, v]), half)
    # `half` alone is micro-batch 0 of `twice` with micro-batch 1 masked out: one compiled program for all three.
    one, _ = _grads(loss, params, extra, _alone(twice, 0, 2), 2)
    again, _ = _grads(loss, params, extra, _alone(twice, 0, 2), 2)
    two, _ = _grads(loss, params, extra, twice, 2)
    no_drop, _ = _grads(finetune.sft_loss(model, SimpleNamespace(train=drop.train, lora=SimpleNamespace(
        rank=4, alpha=8.0, dropout=0.0))), params, extra, half, 1)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same (seed, step, micro-batch): same masks

    def gap(x, y):
        return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    assert gap(one, no_drop) > 1e-3  # dropout is on
    assert gap(two, one) > 1e-3      # micro-batch 1 drew other masks than micro-batch 0
