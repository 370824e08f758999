"""Two processes × 2 CPU devices train exactly like one process × 4 devices, and checkpoints move between them.

The two-process runs are `python -m kslm_jax train` subprocesses on 127.0.0.1, with gloo collectives; the
one-process runs are `kslm train` in this test process (tests/cli_inproc.py), on 4 of its devices. The learning-rate
schedule depends on train.steps, so the references take the same path as the runs they check: 6 steps, then
a resume to 9.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
from conftest import committed_steps, copy_without_clean, logged_losses

import cli_inproc
import cpu_env

from kslm_jax.core import distributed
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.streams=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "checkpoint.every_steps=3", "train.log_every=1",
             "logging.progress_bar=false", "train.eval_batches=2"]
TIMEOUT = 300


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSLM_")}
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_env.flags(devices), **extra)
    return env


def _train_args(wd, steps):
    return ["train", "--workdir", str(wd), *[f"--config.{o}" for o in OVERRIDES], f"--config.train.steps={steps}"]


def _cmd(wd, steps):
    return [sys.executable, "-m", "kslm_jax", *_train_args(wd, steps)]


def _wait(procs):
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        raise
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def start_two(wd, steps):
    """Starts two processes of two devices each; finish_two takes them."""
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(_cmd(wd, steps), cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(2, KSLM_DISTRIBUTED="1", KSLM_COORDINATOR=f"127.0.0.1:{port}",
                                      KSLM_NUM_PROCESSES="2", KSLM_PROCESS_ID=str(i), KSLM_INIT_TIMEOUT="120"))
            for i in range(2)]


def finish_two(procs):
    """[(returncode, stderr)] of process 0 and 1, once both have exited 0."""
    results = _wait(procs)
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-4000:]}"
    return results


def run_one(wd, steps):
    """One process on four devices: `kslm train` in this test process (tests/cli_inproc.py), whose mesh takes 4 of
    its 8 devices, so no run starts Python and JAX again. Returns its stderr."""
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("KSLM_")]:
            mp.delenv(k)
        proc = cli_inproc.kslm(*_train_args(wd, steps))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """The one-process runs go on in this process while the two-process ones they do not depend on train beside
    them: those spend seconds waiting (process 0 at the first collective for process 1, whose compiles jax's
    persistent cache never saves, as it writes entries from process 0 only and on CPU keys them per process)."""
    root = tmp_path_factory.mktemp("multiprocess")
    two, one, moved = root / "two", root / "one", root / "moved"
    for wd in (two, one):
        copy_without_clean(prepared, wd)
    out = {"dirs": (two, one, moved)}
    started = start_two(two, 6)
    try:
        out["one_6"] = run_one(one, 6)
        out["one_6_losses"] = logged_losses(one)
        out["one_9"] = run_one(one, 9)
        out["two_6"] = finish_two(started)
        out["two_6_losses"] = logged_losses(two)
        out["two_6_events"] = len(list((two / "tensorboard").glob("events.*")))
        out["two_6_steps"] = committed_steps(two)
        out["two_6_data"] = [json.loads((two / "checkpoints" / "6" / "data" / f"process_{i}-of-2.json").read_text())
                             for i in (0, 1)]
        out["two_6_eval"] = json.loads((two / "eval" / "lm.json").read_text())
        shutil.copytree(two, moved)                  # the 2-process checkpoint at step 6, for a 1-process resume
        started = start_two(two, 9)
        out["moved_9"] = run_one(moved, 9)
        out["two_9"] = finish_two(started)
    finally:
        for p in started:  # a failed one-process run leaves no two-process run behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def test_two_processes_match_one_process(runs):
    a, b = runs["two_6_losses"], runs["one_6_losses"]
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], abs=1e-5)
    assert runs["two_6_steps"] == [3, 6]
    for _, err in runs["two_6"]:
        assert "restored checkpoint" not in err
    # Only process 0 writes metrics and TensorBoard events (one event file, one row per step).
    assert runs["two_6_events"] == 1
    # Each process saved the state of its own data stream (two streams, one per process).
    assert [sorted(d["streams"]) for d in runs["two_6_data"]] == [["0"], ["1"]]
    assert runs["two_6_eval"]["step"] == 6


def test_two_process_resume_matches(runs):
    two, one, _ = runs["dirs"]
    for i, (_, err) in enumerate(runs["two_9"]):
        assert "restored checkpoint step 6" in err, f"process {i}:\n{err[-3000:]}"
    assert "restored checkpoint step 6" in runs["one_9"]
    a, b = logged_losses(two), logged_losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert [a[s] for s in (7, 8, 9)] == pytest.approx([b[s] for s in (7, 8, 9)], abs=1e-5)
    assert committed_steps(two)[-1] == 9


def test_two_process_checkpoint_resumes_in_one_process(runs):
    _, one, moved = runs["dirs"]
    err = runs["moved_9"]
    assert "restored checkpoint step 6" in err, err[-3000:]
    a, b = logged_losses(moved), logged_losses(one)
    assert [a[s] for s in (7, 8, 9)] == pytest.approx([b[s] for s in (7, 8, 9)], abs=1e-5)


# ---- start-up errors: one line naming the variable, never a C++ abort --------------------------------------

@pytest.mark.parametrize("env, words", [
    ({"KSLM_DISTRIBUTED": "maybe"}, "KSLM_DISTRIBUTED"),
    ({"KSLM_NUM_PROCESSES": "two"}, "KSLM_NUM_PROCESSES='two' is not an integer"),
    ({"KSLM_DISTRIBUTED": "1", "KSLM_NUM_PROCESSES": "2"}, "KSLM_COORDINATOR, KSLM_PROCESS_ID not"),
    ({"KSLM_DISTRIBUTED": "1", "KSLM_COORDINATOR": "localhost", "KSLM_NUM_PROCESSES": "2", "KSLM_PROCESS_ID": "0"},
     "KSLM_COORDINATOR='localhost' must be HOST:PORT"),
    ({"KSLM_DISTRIBUTED": "1", "KSLM_COORDINATOR": "127.0.0.1:1234", "KSLM_NUM_PROCESSES": "2",
      "KSLM_PROCESS_ID": "2"}, "KSLM_PROCESS_ID=2 must be below KSLM_NUM_PROCESSES=2"),
    ({"KSLM_DISTRIBUTED": "1", "KSLM_COORDINATOR": "127.0.0.1:1234", "KSLM_NUM_PROCESSES": "2",
      "KSLM_PROCESS_ID": "-1"}, "KSLM_PROCESS_ID=-1 must be at least 0"),
])
def test_bad_environment_is_one_clear_error(monkeypatch, env, words):
    for k in list(os.environ):
        if k.startswith("KSLM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(KslmError, match=re.escape(words)):
        distributed.initialize_from_env()


def test_no_environment_means_single_process(monkeypatch):
    for k in list(os.environ):
        if k.startswith("KSLM_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("KSLM_NUM_PROCESSES", "1")
    assert distributed.initialize_from_env() is False
    assert distributed.is_primary()


def test_unreachable_coordinator_exits_2_with_one_line(tmp_path, monkeypatch):
    """`kslm train` in this process (tests/cli_inproc.py; test_cli_errors covers a real process's exit). Its
    backend is started first, so that if the pre-flight check missed the dead coordinator, jax.distributed
    would refuse at once with another message instead of aborting the test run in C++."""
    jax.devices()
    for k in [k for k in os.environ if k.startswith("KSLM_")]:
        monkeypatch.delenv(k)
    port = portpicker.pick_unused_port()
    for k, v in dict(KSLM_DISTRIBUTED="1", KSLM_COORDINATOR=f"127.0.0.1:{port}", KSLM_NUM_PROCESSES="2",
                     KSLM_PROCESS_ID="1", KSLM_INIT_TIMEOUT="1").items():
        monkeypatch.setenv(k, v)
    (tmp_path / "run").mkdir()  # a workdir that exists: the coordinator is what fails
    proc = cli_inproc.kslm("train", "--workdir", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kslm: error: cannot reach the coordinator KSLM_COORDINATOR=127.0.0.1:"), last
    assert "within 1s" in last, last


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_process_rows_rebuild_every_micro_batch(accum):
    """sharding.global_batch stacks the processes' rows per micro-batch; they must make the global micro-batch."""
    import numpy as np

    from kslm_jax.data import pipeline
    batch = {"inputs": np.arange(16 * 3).reshape(16, 3)}
    parts = [pipeline._process_rows(batch, index=i, count=2, accum=accum)["inputs"] for i in range(2)]
    for k in range(accum):
        stacked = np.concatenate([p.reshape(accum, -1, 3)[k] for p in parts])
        np.testing.assert_array_equal(stacked, batch["inputs"].reshape(accum, -1, 3)[k])


@pytest.mark.parametrize("accum", [1, 2])
def test_streams_give_the_same_global_batch_for_any_process_count(prepared, accum, monkeypatch):
    """Four streams: one process holding all, or two holding two each, make identical global batches."""
    from kslm_jax.core import config as config_lib
    dcfg = config_lib.base_config().data
    with dcfg.unlocked():
        dcfg.seq_len, dcfg.packing_bins, dcfg.streams = 64, 4, 4
    tokens = prepared / "data" / "tokens"

    def batches(count):
        per_process = []
        for index in range(count):
            monkeypatch.setattr(jax, "process_count", lambda: count)
            monkeypatch.setattr(jax, "process_index", lambda: index)
            it = iter(pipeline.train_dataset(tokens, dcfg, 16, accum))
            per_process.append([next(it) for _ in range(3)])
        # What sharding.global_batch assembles: each micro-batch is the processes' blocks in order.
        out = []
        for step in range(3):
            parts = [p[step]["inputs"].reshape(accum, -1, 64) for p in per_process]
            out.append(np.concatenate(parts, axis=1))
        return out

    one, two = batches(1), batches(2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
