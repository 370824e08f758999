"""Training: loss falls, TensorBoard events are readable, bf16 works, resume is bit-exact."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import cpu_env

from kslm_jax.core import checkpoint
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm

REPO = Path(__file__).resolve().parents[1]


def _trainer(wd, *overrides):
    cfg = workdir_lib.config_for(wd, None, list(overrides), force=True)
    return lm.trainer(cfg, wd)


def test_loss_falls_and_tensorboard_is_readable(workdir):
    summary = _trainer(workdir, "train.steps=30").fit()
    losses = summary["losses"]
    assert np.mean([losses[s] for s in (1, 2, 3)]) - np.mean([losses[s] for s in (28, 29, 30)]) > 1.0
    assert summary["eval"]["bits_per_char"] > 0
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "eval/bits_per_char"):
        assert tag in tags, tag
    assert len(acc.Scalars("train/loss")) == 30
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(losses[30], rel=1e-5)


# Gradient accumulation: tests/test_grad_accum.py checks the exact gradient for every objective.


def test_bf16_compute_with_fp32_master_weights(workdir):
    t = _trainer(workdir, "train.steps=12", "model.dtype=bfloat16")
    summary = t.fit()
    assert summary["losses"][12] < summary["losses"][1] - 0.3
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(t.state.params))


def _run(wd, *extra, env_extra=None, wait=True):
    env = cpu_env.one_device_env(**(env_extra or {}))
    cmd = [sys.executable, "-m", "kslm_jax", "train", "--workdir", str(wd), *[f"--config.{o}" for o in extra]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _losses(wd):
    rows = [json.loads(line) for line in (Path(wd) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _final_params(wd):
    t = _trainer(wd)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    return step, jax.tree.map(np.asarray, state.params)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


RUN = ("train.steps=12", "checkpoint.every_steps=4")


@pytest.fixture(scope="module")
def straight_run(prepared, tmp_path_factory):
    """An uninterrupted run: its metrics.jsonl losses and its final parameters."""
    wd = tmp_path_factory.mktemp("straight") / "run"
    __import__("shutil").copytree(prepared, wd)
    code, _, err = _run(wd, *RUN)
    assert code == 0, err
    return _losses(wd), _final_params(wd)


def _stop_by(wd, sig, at, resumed_from=None):
    code, _, err = _run(wd, *RUN, env_extra={"KSLM_FAULT_SIGTERM_AT_STEP": str(at), "KSLM_FAULT_SIGNAL": sig})
    assert code == 0, err
    if resumed_from is not None:
        assert f"restored checkpoint step {resumed_from}" in err, err
    assert f"SIG{sig} received: saved checkpoint at step {at}" in err
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == at


def test_signals_save_and_resume_is_bit_exact(straight_run, workdir):
    """SIGTERM, then SIGINT on the resumed run, each between two regular saves (steps 4, 8, 12); the third start
    finishes with every logged loss and every parameter of the uninterrupted run, exactly."""
    _stop_by(workdir, "TERM", 5)
    _stop_by(workdir, "INT", 9, resumed_from=5)
    code, _, err = _run(workdir, *RUN)
    assert code == 0, err
    assert "restored checkpoint step 9" in err
    ref_losses, (ref_step, ref_params) = straight_run
    assert _losses(workdir) == ref_losses and len(ref_losses) == 12     # every step 1..12, exactly
    step, params = _final_params(workdir)
    assert ref_step == step == 12
    _assert_same_params(ref_params, params)


# kill -9 at a random moment (mid-save included): tests/faults/test_kill.py.
