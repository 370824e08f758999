"""A SIGTERM that reaches one process of a 2-process run stops both at the same step, and both save it.

Each process stopping on its own flag would save different steps (or hang in the collective save); the
preemption service makes every process stop after the same step (train/preemption.py).
"""
import re
import subprocess

import portpicker
from conftest import committed_steps, copy_without_clean
from test_multiprocess import REPO, _cmd, _env

SIGNALLED = 1   # only this process receives SIGTERM, after its step 3
STEPS = 20      # far beyond the stop: a process that misses the notice would go on training


def test_sigterm_to_one_process_stops_both_at_the_same_step(prepared, tmp_path):
    wd = tmp_path / "run"
    copy_without_clean(prepared, wd)
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        extra = dict(KSLM_DISTRIBUTED="1", KSLM_COORDINATOR=f"127.0.0.1:{port}", KSLM_NUM_PROCESSES="2",
                     KSLM_PROCESS_ID=str(i), KSLM_INIT_TIMEOUT="120")
        if i == SIGNALLED:
            extra["KSLM_FAULT_SIGTERM_AT_STEP"] = "3"
        procs.append(subprocess.Popen([*_cmd(wd, STEPS), "--config.checkpoint.every_steps=1000"], cwd=REPO,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=_env(2, **extra)))
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("the processes did not stop together (a collective save hung)") from None
    saved = []
    for i, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
        m = re.search(r"SIGTERM received: saved checkpoint at step (\d+)", err)
        assert m, f"process {i} did not report the emergency save:\n{err[-3000:]}"
        saved.append(int(m.group(1)))
    assert saved[0] == saved[1]
    assert 3 <= saved[0] < STEPS
    assert committed_steps(wd) == [saved[0]]
    # each process wrote its own data-stream state into that one checkpoint
    written = {p.name for p in (wd / "checkpoints" / str(saved[0]) / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= written, saved
