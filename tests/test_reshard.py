"""A checkpoint written under one mesh restores into any other: FSDP over 8 devices → 1 device and → 4-way tensor
parallel, with identical values and the shardings the new mesh asks for."""
import shutil

import jax
import numpy as np
import pytest

from kslm_jax.core import checkpoint
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm

# n_kv_heads=4 so that every head, MLP and (padded) vocabulary dimension divides by tensor=4.
SHAPE = ["model.n_kv_heads=4"]


def _trainer(wd, mesh, *extra):
    d, f, t = mesh
    cfg = workdir_lib.config_for(wd, None, [*SHAPE, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                                            "train.steps=3", "checkpoint.every_steps=1000", "train.eval_batches=1",
                                            *extra], force=True)
    return lm.trainer(cfg, wd)


def _restore(wd, mesh):
    t = _trainer(wd, mesh)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    return t, step, state


def _gate(state):
    return state.params["layers"]["mlp"]["gate_proj"]["kernel"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_fsdp8_checkpoint_restores_on_one_device_and_on_tensor4(workdir, tmp_path):
    wd = tmp_path / "reshard"
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("checkpoints"))
    trainer = _trainer(wd, (1, 8, 1))
    trainer.init_fresh()
    assert trainer.fit()["step"] == 3
    saved = trainer.state
    d_ff, vocab = config_lib.d_ff(trainer.cfg), config_lib.padded_vocab(trainer.cfg)
    assert d_ff % 4 == 0 and vocab % 4 == 0
    kernel = _gate(saved)          # (layers, embed, mlp): embed split 8 ways
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 8, d_ff)

    one_t, one_step, one = _restore(wd, (1, 1, 1))
    tp_t, tp_step, tp = _restore(wd, (1, 1, 4))
    assert one_step == tp_step == 3

    # Same values everywhere: parameters, optimizer moments, step counter and rng.
    ref = jax.tree.map(np.asarray, saved)
    for restored in (one, tp):
        assert jax.tree.structure(restored) == jax.tree.structure(saved)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(jax.tree.map(np.asarray, restored))):
            assert np.array_equal(a, b)

    # ...in the shardings each new mesh asks for.
    for got, want in zip(jax.tree.leaves(one), jax.tree.leaves(one_t.shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
        assert got.sharding.is_fully_replicated and len(got.sharding.device_set) == 1
    for got, want in zip(jax.tree.leaves(tp), jax.tree.leaves(tp_t.shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    k = _gate(tp)
    assert dict(k.sharding.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 4}
    assert tuple(k.sharding.spec) == (None, "fsdp", "tensor")        # mlp over tensor
    assert len(k.addressable_shards) == 4
    assert {s.data.shape for s in k.addressable_shards} == {(k.shape[0], k.shape[1], d_ff // 4)}
    emb = tp.params["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (vocab // 4, emb.shape[1])   # vocab over tensor
    assert tp.params["norm"]["scale"].sharding.is_fully_replicated

