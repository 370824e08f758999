"""`kslm sweep` on the tiny prepared workdir: it finds the learning rates a tiny model trains well with, resumes
after kill -9 without counting a trial twice, shares one SQLite study between two processes, and writes the
TensorBoard HParams runs. Every trial is a real `kslm train` subprocess of 20 steps, on one CPU device with the
suite's fast-compile XLA flags: a trial's time is its Python start-up and compiles, so the tests start as few as
they can (4 trials find the lr region; the kill test adds a fifth trial to that same study)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna  # the test extra installs the sweep extra, so a missing optuna is an install error
import pytest
import sqlalchemy  # optuna's storage: present wherever optuna is

import cpu_env

from kslm_jax.cli import sweep_space
from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError


REPO = Path(__file__).resolve().parents[1]
STEPS = ["--budget-steps", "20", "--config.train.eval_every=5", "--config.checkpoint.every_steps=5"]
LR_SPACE = ("--space", "optim.lr=loguniform(1e-5,1e-1)", "--sampler", "qmc", "--seed", 0)
LR_TRIALS = 4


def _cmd(wd, *args):
    return [sys.executable, "-m", "kslm_jax", "sweep", "--workdir", str(wd), *STEPS, *map(str, args)]


def _env():
    # Trials inherit the sweep's environment: one device (mesh.data=1), not the suite's 8 fake ones.
    return cpu_env.one_device_env(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _sweep(wd, *args, timeout=600):
    proc = subprocess.run(_cmd(wd, *args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _study(storage):
    return optuna.load_study(study_name="kslm-sweep", storage=storage)


def _trials(storage, *states):
    try:
        return [t for t in _study(storage).trials if t.state.name in states]
    except KeyError:  # the database exists, the study not yet
        return []
    except sqlalchemy.exc.IntegrityError:  # the sweep is creating the schema this moment: optuna stamps it too
        return []


@pytest.fixture(scope="module")
def lr_sweep(prepared, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep") / "run"
    shutil.copytree(prepared, wd)
    proc = _sweep(wd, *LR_SPACE, "--trials", LR_TRIALS, "--parallel", 2)
    return wd, proc


def test_sweep_finds_the_good_lr_region(lr_sweep):
    wd, proc = lr_sweep
    trials = _trials(f"sqlite:///{wd / 'sweep.db'}", "COMPLETE", "PRUNED")
    assert len(trials) == LR_TRIALS, proc.stderr
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value)
    worst = max(trials, key=lambda t: t.value)
    # Scrambled Sobol draws one lr in each quarter of the log range: its first 4 points cover 1e-5..1e-1 evenly.
    # 20 steps: 1e-5 barely moves the weights; the optimum of this model lies well inside the range.
    assert 3e-4 < best.params["optim.lr"] < 6e-2, [(t.params, t.value) for t in trials]
    assert best.value < worst.value - 0.5
    # The lowest lr is the worst trial: it barely leaves the initial loss, which even a trial pruned at its first
    # evaluation is below.
    assert worst.params["optim.lr"] == min(t.params["optim.lr"] for t in trials)
    record = __import__("json").loads((wd / "best.json").read_text())
    assert record["trial"] == best.number and record["params"]["optim.lr"] == best.params["optim.lr"]
    # The winner is an ordinary workdir: its config holds the trial's lr and its checkpoint is at the budget.
    winner = Path(record["workdir"])
    assert config_lib.read_workdir_config(winner).optim.lr == best.params["optim.lr"]
    assert (winner / "checkpoints" / "20").is_dir()
    assert "rank  trial  state" in proc.stdout


def test_hparams_tags(lr_sweep):
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    wd, _ = lr_sweep
    mux = event_multiplexer.EventMultiplexer(size_guidance={"tensors": 0, "scalars": 0})
    mux.AddRunsFromDirectory(str(wd / "tensorboard_sweep"))
    mux.Reload()
    content = mux.PluginRunToTagToContent("hparams")
    done = _trials(f"sqlite:///{wd / 'sweep.db'}", "COMPLETE", "PRUNED")
    assert set(content) == {f"trial_{t.number:03d}" for t in done}
    for t in done:
        tags = content[f"trial_{t.number:03d}"]
        assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(tags)
        start = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["optim.lr"].number_value == pytest.approx(t.params["optim.lr"])
        scalars = mux.Scalars(f"trial_{t.number:03d}", "hparam/bits_per_char")
        assert scalars[-1].value == pytest.approx(t.value, rel=1e-5)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc (the trial's death with its parent is Linux-only)."""
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
        except (OSError, IndexError):  # it ended while we looked
            continue
    return kids


def _running(pid: int) -> bool:
    """Alive (a stopped process too); a zombie has ended."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_sweep_resumes_without_duplicates(lr_sweep, tmp_path):
    # The lr sweep's finished study, asked for one trial more: trials 000..003 are done before the kill.
    wd = tmp_path / "run"
    shutil.copytree(lr_sweep[0], wd)
    args = (*LR_SPACE, "--trials", LR_TRIALS + 1, "--heartbeat", 1, "--pruner", "none")
    last = f"trials/{LR_TRIALS:03d}"
    storage = f"sqlite:///{wd / 'sweep.db'}"
    parent = subprocess.Popen(_cmd(wd, *args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # Kill once the new trial has sealed its first checkpoint (step 5 of 20), so that the retry has one to resume.
    deadline = time.time() + 300
    while not (wd / last / "checkpoints/5/kslm_checksums.json").is_file():
        assert parent.poll() is None, "the sweep ended before it could be killed"
        assert time.time() < deadline, "the last trial never reached a checkpoint"
        time.sleep(0.1)
    trial_procs = _children(parent.pid)
    assert trial_procs, "the sweep's trial process was not found"
    # Frozen, the trial can neither finish its budget nor exit by itself: only its parent's death can end it now.
    for pid in trial_procs:
        os.kill(pid, signal.SIGSTOP)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert [t.number for t in _trials(storage, "RUNNING")] == [LR_TRIALS]
    deadline = time.time() + 10
    while any(_running(pid) for pid in trial_procs):
        if time.time() > deadline:
            for pid in trial_procs:
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the trial outlived its killed sweep")
        time.sleep(0.05)

    proc = _sweep(wd, *args)
    trials = _study(storage).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == LR_TRIALS + 1 and not [t for t in trials if t.state.name == "RUNNING"], proc.stderr
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [LR_TRIALS]  # the killed one: failed, then re-run as a new trial number
    retry = done[-1]
    assert retry.number > LR_TRIALS and retry.params == failed[0].params and retry.user_attrs["workdir"].endswith(last)
    assert sorted(p.name for p in (wd / "trials").iterdir()) == [f"{i:03d}" for i in range(LR_TRIALS + 1)]
    assert "restored checkpoint step" in (wd / last / "train.log").read_text()  # it resumed, not restarted
    assert f"resuming: {LR_TRIALS} of {LR_TRIALS + 1} trials already finished" in proc.stderr


def test_two_processes_share_one_sqlite_study(prepared, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ("--space", "optim.lr=loguniform(1e-3,1e-2)", "--trials", 2, "--storage", storage)
    procs = [subprocess.Popen(_cmd(wd, *args, "--seed", i), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _study(storage).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 2
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["workdir"] for t in done}) == 2  # no trial trained twice
    # Both processes ran trials: the sweep really was shared.
    assert all("trial 0" in err for _, err in outs), outs
    assert not (wd / "sweep.db").exists()


@pytest.mark.parametrize("spec, words", [
    ("optim.lr=loguniform(0,1e-2)", "positive low bound"),
    ("optim.lr=loguniform(1e-2,1e-3)", "must be below"),
    ("optim.lr=lognormal(1,2)", "unknown kind"),
    ("optim.lr=uniform(1e-3)", "two finite numbers"),
    ("train.batch_size=int(8,16.5)", "two integers"),
    ("train.batch_size=choice(16,16)", "listed twice"),
    ("optim.lr=uniform(__import__('os'),1)", "cannot read"),
    ("optim.lr", "expected KEY=KIND(ARGS)"),
])
def test_bad_space_is_one_error_naming_it(spec, words):
    with pytest.raises(KslmError, match=re.escape(words)) as e:
        sweep_space.parse_all(config_lib.load("tiny_ko"), [spec])
    assert f"--space {spec!r}" in str(e.value)


def test_space_keys_are_checked_against_the_config():
    cfg = config_lib.load("tiny_ko")
    with pytest.raises(KslmError, match="defines the prepared data"):
        sweep_space.parse_all(cfg, ["tokenizer.vocab_size=choice(1000,2000)"])
    with pytest.raises(KslmError, match="unknown config key"):
        sweep_space.parse_all(cfg, ["optim.learning_rate=loguniform(1e-4,1e-2)"])
    with pytest.raises(KslmError, match="cannot read"):
        sweep_space.parse_all(cfg, ["train.batch_size=choice(16,big)"])
    p = sweep_space.parse_all(cfg, ["model.remat=choice(none,'dots')", "train.batch_size=int(8,32)"])
    assert p[0].values == ("none", "dots") and p[1].values == (8, 32)
