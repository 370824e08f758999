"""The same few steps on 1 device and on 8 fake CPU devices in two mesh shapes give the same losses.

Pure data parallelism (8, 1, 1) is left out: it costs a compile of its own, and the data axis is split here by
(2, 2, 2) and in tests/test_grad_accum.py's 2 x 2 mesh (data x fsdp), whose gradients match one device's."""
import jax
import numpy as np
import pytest

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm

MESHES = [(1, 1, 1), (2, 2, 2), (1, 4, 2)]
STEPS = 3  # losses 2 and 3 come after one and two updates


def _losses(wd, mesh):
    d, f, t = mesh
    cfg = workdir_lib.config_for(wd, None, [f"train.steps={STEPS}", "checkpoint.every_steps=1000",
                                            "train.eval_batches=1", f"mesh.data={d}", f"mesh.fsdp={f}",
                                            f"mesh.tensor={t}"], force=True)
    trainer = lm.trainer(cfg, wd)
    trainer.init_fresh()
    summary = trainer.fit()
    return [summary["losses"][s] for s in range(1, STEPS + 1)], trainer


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
