"""The same few steps on 1 device and on 8 fake CPU devices in three mesh shapes give the same losses."""
import jax
import numpy as np
import pytest

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _losses(wd, mesh):
    d, f, t = mesh
    cfg = workdir_lib.config_for(wd, None, ["train.steps=4", "checkpoint.every_steps=1000", "train.eval_batches=1",
                                            f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"], force=True)
    trainer = lm.trainer(cfg, wd)
    trainer.init_fresh()
    summary = trainer.fit()
    return [summary["losses"][s] for s in range(1, 5)], trainer


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_meshes_agree(workdir, tmp_path):
    import shutil
    results = {}
    for mesh in MESHES:
        wd = tmp_path / f"mesh{''.join(map(str, mesh))}"
        shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("checkpoints"))
        results[mesh], trainer = _losses(wd, mesh)
        if mesh == (1, 4, 2):
            # Parameters really are split: the MLP kernel over fsdp x tensor, norms replicated.
            spec = trainer.state.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
            assert tuple(spec) == (None, "fsdp", "tensor")
    for mesh in MESHES[1:]:
        np.testing.assert_allclose(results[mesh], results[MESHES[0]], rtol=2e-5, atol=2e-5)
