"""Issue 17, items 2, 8 and 9 and unsealed steps: a damaged, foreign or half-sealed step folder never shadows
a new save, a save that did not happen is never reported, and a changed config is named as such."""
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import committed_steps

from kslm_jax.core import checkpoint
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.objectives import lm

ARGS = ["checkpoint.every_steps=2", "train.eval_every=0"]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    wd = tmp_path_factory.mktemp("steps") / "run"
    shutil.copytree(prepared, wd)
    lm.trainer(workdir_lib.config_for(wd, None, ["train.steps=6", *ARGS], force=True), wd).fit()
    return wd


def _copy(trained, tmp_path) -> Path:
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    return wd


def _fit(wd, steps):
    return lm.trainer(workdir_lib.config_for(wd, None, [f"train.steps={steps}", *ARGS]), wd).fit()


def _restored(wd):
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    with jax.set_mesh(t.mesh):
        return checkpoint.restore_params(t.paths["checkpoints"], t.abstract)


def _truncate_largest(step_dir: Path):
    f = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.CHECKSUMS),
            key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_damaged_newest_step_is_moved_aside_and_saved_again(trained, tmp_path, caplog):
    wd = _copy(trained, tmp_path)
    _truncate_largest(wd / "checkpoints" / "6")
    _fit(wd, 6)  # the same command again: restores step 4, trains 5 and 6, must save 6 anew
    assert "moved it aside" in caplog.text and "checkpoints-set-aside" in caplog.text
    aside = list((wd / "checkpoints-set-aside").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["6"]  # kept, not deleted
    step, state = _restored(wd)
    assert step == 6
    checkpoint.verify(wd / "checkpoints" / "6")  # the new step 6 is whole and sealed
    assert (wd / "checkpoints" / "6" / checkpoint.CHECKSUMS).is_file()


def test_sigterm_save_over_a_damaged_step_is_real(trained, tmp_path, monkeypatch, caplog):
    wd = _copy(trained, tmp_path)
    _truncate_largest(wd / "checkpoints" / "6")
    caplog.set_level(logging.INFO, logger="kslm")
    monkeypatch.setenv("KSLM_FAULT_SIGTERM_AT_STEP", "6")
    summary = _fit(wd, 10)
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 6
    assert "saved checkpoint at step 6" in caplog.text
    assert _restored(wd)[0] == 6  # what the log said was saved is there


def test_foreign_step_folder_does_not_block_saves(trained, tmp_path, caplog):
    wd = _copy(trained, tmp_path)
    junk = wd / "checkpoints" / "10"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    _fit(wd, 10)
    assert _restored(wd)[0] == 10
    assert committed_steps(wd)[-1] == 10
    moved = list((wd / "checkpoints-set-aside").glob("10-*"))
    assert len(moved) == 1 and (moved[0] / "notes.txt").read_text() == "not a checkpoint"


def test_forced_save_that_orbax_refuses_raises(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    with checkpoint.manager(t.paths["checkpoints"], t.cfg.checkpoint) as mngr, jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_latest(mngr, t.abstract, None)
        mngr.save = lambda *a, **k: False  # what orbax answers for a step it will not write
        with pytest.raises(KslmError, match="was not saved"):
            checkpoint.save(mngr, 8, state, None, force=True)


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_writer_only(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    left = wd / "checkpoints" / "9.orbax-checkpoint-tmp"  # what a kill during an async save leaves
    left.mkdir()
    (left / "_CHECKPOINT_METADATA").write_text("{}")
    assert _restored(wd)[0] == 6 and left.is_dir()  # eval/export read while a trainer may be saving
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    # orbax removes it in the background and waits for that before its next save, which is what a resumed
    # run does next
    with checkpoint.manager(t.paths["checkpoints"], t.cfg.checkpoint) as mngr, jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_latest(mngr, t.abstract, None)
        assert step == 6 and checkpoint.save(mngr, 8, state, None, force=True)
        mngr.wait_until_finished()
    assert not left.exists() and committed_steps(wd)[-1] == 8


def test_changed_model_shape_is_named_not_called_damage(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    cfg = json.loads((wd / "config.json").read_text())
    cfg["model"]["d_model"] = 96
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KslmError) as info:
        _restored(wd)
    msg = str(info.value)
    assert "intact" in msg and "another model shape" in msg and "(1024, 64)" in msg and "(1024, 96)" in msg, msg
    assert "\n" not in msg


def test_step_without_fp8_meta_restores_and_fp8_delayed_names_it(trained, tmp_path):
    """A step saved before TrainState had fp8_meta (orbax's tree lacks the field) restores as before; switched
    to model.matmul_precision=fp8_delayed, the run is told the step lacks its meta, and the step stays put."""
    wd = _copy(trained, tmp_path)
    step, state = _restored(wd)
    shutil.rmtree(wd / "checkpoints")
    with ocp.CheckpointManager((wd / "checkpoints").absolute()) as mngr:
        older = {k: v for k, v in vars(state).items() if k != "fp8_meta"}
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(older)))
    again_step, again = _restored(wd)
    assert again_step == step and again.fp8_meta == {}
    jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
    cfg = json.loads((wd / "config.json").read_text())
    cfg["model"]["matmul_precision"] = "fp8_delayed"
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KslmError) as info:
        _restored(wd)
    assert "another model shape" in str(info.value) and "fp8_meta/layers/" in str(info.value), str(info.value)
    assert committed_steps(wd) == [step]


def test_interrupted_seal_does_not_poison_the_step(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    step_dir = wd / "checkpoints" / "6"
    (step_dir / checkpoint.CHECKSUMS).replace(step_dir / f".{checkpoint.CHECKSUMS}.tmp")  # killed mid-seal
    checkpoint._seal_dir(step_dir)  # the next seal of this step
    want = json.loads((step_dir / checkpoint.CHECKSUMS).read_text())
    assert not any(name.startswith(".kslm") for name in want), sorted(want)
    checkpoint.verify(step_dir)  # passes now and after the temp file is gone
    assert _restored(wd)[0] == 6


def test_unsealed_damaged_step_is_neither_trusted_nor_sealed(trained, tmp_path, caplog):
    wd = _copy(trained, tmp_path)
    step_dir = wd / "checkpoints" / "6"
    (step_dir / checkpoint.CHECKSUMS).unlink()  # killed between orbax's commit and our seal
    for f in step_dir.rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(b"\0" * f.stat().st_size)  # zeroed data files, sizes kept
    _fit(wd, 8)
    assert "checkpoint step 6 is damaged" in caplog.text
    assert list((wd / "checkpoints-set-aside").glob("6-*"))
    assert not list((wd / "checkpoints-set-aside").glob(f"6-*/{checkpoint.CHECKSUMS}"))  # never sealed
    step, state = _restored(wd)
    assert step == 8 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_intact_unsealed_step_is_restored_then_sealed(trained, tmp_path, caplog):
    wd = _copy(trained, tmp_path)
    step_dir = wd / "checkpoints" / "6"
    (step_dir / checkpoint.CHECKSUMS).unlink()
    caplog.set_level(logging.INFO, logger="kslm")
    _fit(wd, 8)
    assert "restored checkpoint step 6" in caplog.text
    assert (step_dir / checkpoint.CHECKSUMS).is_file()
    checkpoint.verify(step_dir)


def test_cadence_and_retention_come_from_orbax_policies(prepared, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    over = ["train.steps=11", "checkpoint.every_steps=2", "checkpoint.keep=2", "checkpoint.keep_every=4"]
    lm.trainer(workdir_lib.config_for(wd, None, over, force=True), wd).fit()
    kept = committed_steps(wd)
    assert kept == [4, 8, 10, 11], kept  # newest 2, every 4th kept for good, the final step always saved
    assert os.path.isfile(wd / "checkpoints" / "11" / checkpoint.CHECKSUMS)
