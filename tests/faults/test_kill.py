"""kill -9 at random moments, including mid-checkpoint: the next start restores the newest complete
checkpoint (never a partial one), says which, and finishes with the parameters of an uninterrupted run.

CI runs KSLM_FAULT_REPEATS (default 1) random timings; `python benchmarks/faults.py` runs 20 or more.
"""
import json
import os
import random
import re
import shutil
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

REPO = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("KSLM_FAULT_REPEATS", "1"))
ARGS = ["--config.train.steps=16", "--config.checkpoint.every_steps=2", "--config.logging.progress_bar=false",
        "--config.train.log_every=1"]


def _start(wd):
    env = cpu_env.one_device_env()
    return subprocess.Popen([sys.executable, "-m", "kslm_jax", "train", "--workdir", str(wd), *ARGS], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _params(wd):
    t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _losses(wd) -> dict:
    path = Path(wd) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else []  # not a half-written last one
    rows = [json.loads(line) for line in lines]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _committed(wd):
    return sorted(int(p.name) for p in (Path(wd) / "checkpoints").glob("*") if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    wd = tmp_path_factory.mktemp("kill-ref") / "run"
    shutil.copytree(prepared, wd)
    proc = _start(wd)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return wd, _params(wd), _losses(wd)


@pytest.mark.parametrize("trial", range(REPEATS))
def test_kill_9_then_resume(prepared, reference, tmp_path, trial):
    ref_wd, (ref_step, ref_params), ref_losses = reference
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    rng = random.Random(1000 + trial)
    proc = _start(wd)
    # Wait for the first step's metrics (compilation done), then kill at a random moment of the 16 steps,
    # whose checkpoints every 2 steps are written asynchronously: many kills land in the middle of one. A fast
    # machine is killed by step 12 at the latest, so the run never finishes first.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _losses(wd):
        time.sleep(0.01)
    kill_at = time.time() + rng.uniform(0.0, 1.5)
    while time.time() < kill_at and proc.poll() is None and max(_losses(wd), default=0) < 12:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    assert killed, "the run finished before it could be killed"
    newest = max(_committed(wd), default=None)
    resumed = _start(wd)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    found = re.search(r"restored checkpoint step (\d+)", err)
    if newest is None:
        assert found is None
    else:
        assert found and int(found.group(1)) == newest, (newest, err[-1500:])
    restored = int(found.group(1)) if found else 0
    losses = _losses(wd)   # a step logged twice (before the kill and after the resume) counts its last value
    assert all(losses[s] == ref_losses[s] for s in range(restored + 1, 17)), (restored, losses, ref_losses)
    step, params = _params(wd)
    assert step == ref_step == 16
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(a, b)
    (tmp_path.parent / f"kill-trial-{trial}.json").write_text(json.dumps(
        {"killed": killed, "restored_from": newest}))
