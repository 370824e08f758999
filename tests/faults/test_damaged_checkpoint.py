"""A checkpoint damaged after it was written (truncated, deleted or altered file) is detected, reported
and skipped for the previous one; it is never silently loaded."""
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from kslm_jax.core import checkpoint
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.CHECKSUMS),
               key=lambda p: p.stat().st_size)


def truncate(step_dir):
    f = _largest_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete(step_dir):
    _largest_file(step_dir).unlink()


def flip(step_dir):
    f = _largest_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    wd = tmp_path_factory.mktemp("damage") / "run"
    shutil.copytree(prepared, wd)
    cfg = workdir_lib.config_for(wd, None, ["train.steps=6", "checkpoint.every_steps=2"], force=True)
    lm.trainer(cfg, wd).fit()
    assert all((wd / "checkpoints" / str(s) / checkpoint.CHECKSUMS).is_file() for s in (2, 4, 6))
    return wd


@pytest.mark.parametrize("damage", [truncate, delete, flip])
def test_damaged_newest_step_falls_back(trained, tmp_path, damage, caplog):
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    damage(wd / "checkpoints" / "6")
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    assert step == 4
    assert "checkpoint step 6 is damaged" in caplog.text
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_every_step_damaged_is_a_clear_error(trained, tmp_path):
    from kslm_jax.core.errors import KslmError
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    for s in (2, 4, 6):
        flip(wd / "checkpoints" / str(s))
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    with pytest.raises(KslmError, match="could be restored"), jax.set_mesh(t.mesh):
        checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
