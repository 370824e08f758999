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
    """The trainer's first STEPS losses on `mesh`, each batch laid out by the loop's own `device_batch`. The rest of the loop is left out: its
    final checkpoint and eval pass cost a third of this test on 2 cores (2.4 s to save the (2, 2, 2) state), and
    saving under a mesh is tests/test_reshard.py's."""
    d, f, t = mesh
    cfg = workdir_lib.config_for(wd, None, [f"train.steps={STEPS}", f"mesh.data={d}", f"mesh.fsdp={f}",
                                            f"mesh.tensor={t}"], force=True)
    trainer = lm.trainer(cfg, wd)
    trainer.init_fresh()
    data, losses = trainer.objective.batches(), []
    with jax.set_mesh(trainer.mesh):
        for _ in range(STEPS):
            trainer.state, out = trainer.train_step(trainer.state, trainer.device_batch(next(data)), trainer.extra)
            assert int(out["nonfinite"]) == 0
            losses.append(float(out["ce_sum"]) / int(out["tokens"]))
    return losses, trainer


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_meshes_agree(workdir):
    results = {}
    for mesh in MESHES:
        results[mesh], trainer = _losses(workdir, mesh)
        if mesh == (1, 4, 2):
            # Parameters really are split: the MLP kernel over fsdp x tensor, norms replicated.
            spec = trainer.state.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
            assert tuple(spec) == (None, "fsdp", "tensor")
    for mesh in MESHES[1:]:
        np.testing.assert_allclose(results[mesh], results[MESHES[0]], rtol=2e-5, atol=2e-5)
