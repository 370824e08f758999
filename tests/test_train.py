"""Training: loss falls, TensorBoard events are readable, bf16 works, resume is bit-exact."""
import json
import random
import signal
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def straight_run(prepared, tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight") / "run"
    __import__("shutil").copytree(prepared, wd)
    code, _, err = _run(wd, "train.steps=20", "checkpoint.every_steps=5")
    assert code == 0, err
    return wd


@pytest.mark.parametrize("sig,at", [("TERM", 12), ("INT", random.Random(7).randint(2, 18))])
def test_signal_saves_and_resume_is_bit_exact(straight_run, workdir, sig, at):
    code, _, err = _run(workdir, "train.steps=20", "checkpoint.every_steps=5",
                        env_extra={"KSLM_FAULT_SIGTERM_AT_STEP": str(at), "KSLM_FAULT_SIGNAL": sig})
    assert code == 0, err
    assert f"SIG{sig} received: saved checkpoint at step {at}" in err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == at
    code, _, err = _run(workdir, "train.steps=20", "checkpoint.every_steps=5")
    assert code == 0, err
    assert f"restored checkpoint step {at}" in err
    assert _losses(workdir) == _losses(straight_run)     # every step 1..20, exactly
    step_a, a = _final_params(straight_run)
    step_b, b = _final_params(workdir)
    assert step_a == step_b == 20
    _assert_same_params(a, b)


def test_kill_9_resumes_from_last_complete_checkpoint(straight_run, workdir):
    proc = _run(workdir, "train.steps=20", "checkpoint.every_steps=5", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "checkpoints" / "10").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    code, _, err = _run(workdir, "train.steps=20", "checkpoint.every_steps=5")
    assert code == 0, err
    assert any(f"restored checkpoint step {s}" in err for s in (10, 15)), err
    ref = _losses(straight_run)
    resumed = {s: v for s, v in _losses(workdir).items()}
    assert all(resumed[s] == ref[s] for s in range(15, 21))
    _assert_same_params(_final_params(straight_run)[1], _final_params(workdir)[1])
