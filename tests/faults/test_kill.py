"""kill -9 at random moments, including mid-checkpoint: the next start restores the newest complete
checkpoint (never a partial one), says which, and finishes with the losses and parameters of an uninterrupted run.

CI runs KSLM_FAULT_REPEATS (default 1) random timings; `python benchmarks/faults.py` runs 20 or more.
"""
import json
import os
import random
import re
import signal
import time

import numpy as np
import pytest
from conftest import committed_steps

REPEATS = int(os.environ.get("KSLM_FAULT_REPEATS", "1"))


@pytest.mark.parametrize("trial", range(REPEATS))
def test_kill_9_then_resume(uninterrupted, tmp_path, trial):
    run = uninterrupted   # 16 steps, a checkpoint every 2 (tests/conftest.py)
    wd = run.copy(tmp_path / "run")
    rng = random.Random(1000 + trial)
    proc = run.start(wd)
    # Wait for the first step's metrics (compilation done), then kill at a random moment of the 16 steps,
    # whose checkpoints every 2 steps are written asynchronously: many kills land in the middle of one. A fast
    # machine is killed by step 12 at the latest, so the run never finishes first.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not run.losses_of(wd):
        time.sleep(0.01)
    kill_at = time.time() + rng.uniform(0.0, 1.5)
    while time.time() < kill_at and proc.poll() is None and max(run.losses_of(wd), default=0) < 12:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    assert killed, "the run finished before it could be killed"
    newest = max(committed_steps(wd), default=None)
    resumed = run.start(wd)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    found = re.search(r"restored checkpoint step (\d+)", err)
    if newest is None:
        assert found is None
    else:
        assert found and int(found.group(1)) == newest, (newest, err[-1500:])
    restored = int(found.group(1)) if found else 0
    losses = run.losses_of(wd)   # a step logged before the kill and again after the resume counts its last value
    assert all(losses[s] == run.losses[s] for s in range(restored + 1, 17)), (restored, losses, run.losses)
    step, params = run.params_of(wd)
    assert step == run.step == 16
    for a, b in zip(params, run.params):
        np.testing.assert_array_equal(a, b)
    (tmp_path.parent / f"kill-trial-{trial}.json").write_text(json.dumps(
        {"killed": killed, "restored_from": newest}))
