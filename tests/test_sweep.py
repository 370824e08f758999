"""`kslm sweep` on the tiny prepared workdir: it finds the learning rates a tiny model trains well with, resumes
after kill -9 without counting a trial twice, shares one SQLite study between two processes, and writes the
TensorBoard HParams runs. Every trial is a real `kslm train` subprocess of 10 steps, on one CPU device with the
suite's fast-compile XLA flags: a trial's time is its Python start-up and compiles, so the tests start as few as
they can (4 trials find the lr region; the kill test adds a fifth trial to that same study, and two processes
resume it together, which is also the shared-study test)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna  # the test extra installs the sweep extra, so a missing optuna is an install error
import pytest
import sqlalchemy  # optuna's storage: present wherever optuna is

import cpu_env

from kslm_jax.cli import sweep as sweep_lib
from kslm_jax.cli import sweep_space
from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError


REPO = Path(__file__).resolve().parents[1]
BUDGET = 10
STEPS = ["--budget-steps", BUDGET, "--config.train.eval_every=5"]
LR_SPACE = ("--space", "optim.lr=loguniform(1e-5,1e-1)", "--sampler", "qmc", "--seed", 0)
LR_TRIALS = 4


def _cmd(wd, *args):
    return [sys.executable, "-m", "kslm_jax", "sweep", "--workdir", str(wd), *map(str, (*STEPS, *args))]


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
    # One checkpoint per trial, at the budget (a pruned trial saves where SIGTERM finds it).
    proc = _sweep(wd, *LR_SPACE, "--trials", LR_TRIALS, "--parallel", 2, f"--config.checkpoint.every_steps={BUDGET}")
    return wd, proc


def test_sweep_finds_the_good_lr_region(lr_sweep):
    wd, proc = lr_sweep
    trials = _trials(f"sqlite:///{wd / 'sweep.db'}", "COMPLETE", "PRUNED")
    assert len(trials) == LR_TRIALS, proc.stderr
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value)
    worst = max(trials, key=lambda t: t.value)
    # Scrambled Sobol draws one lr in each quarter of the log range: its first 4 points cover 1e-5..1e-1 evenly.
    # 10 steps: 1e-5 barely moves the weights; the optimum of this model lies well inside the range.
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
    assert (winner / "checkpoints" / str(BUDGET)).is_dir()
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


def test_killed_sweep_resumes_in_two_processes_without_duplicates(lr_sweep, tmp_path):
    # The lr sweep's finished study, moved to a --storage outside the workdir and asked for one trial more:
    # trials 000..003 are done before the kill.
    wd = tmp_path / "run"
    shutil.copytree(lr_sweep[0], wd)
    db = tmp_path / "shared.db"
    (wd / "sweep.db").rename(db)
    storage = f"sqlite:///{db}"
    args = (*LR_SPACE, "--heartbeat", 1, "--pruner", "none", "--storage", storage)
    killed = wd / "trials" / f"{LR_TRIALS:03d}"
    # A checkpoint every step until the kill (checkpoint.* may change between runs of one trial): the first one
    # committed leaves the trial most of its budget, which it cannot finish once it is frozen below.
    parent = subprocess.Popen(_cmd(wd, *args, "--trials", LR_TRIALS + 1, "--config.checkpoint.every_steps=1"),
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the new trial has committed its first checkpoint, so that the retry has one to resume.
    deadline = time.time() + 300
    while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
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

    # Two processes resume the study together, asked for one trial more again: the killed trial and a new one
    # remain, one for each. This is also the shared-storage test (README: several processes or hosts run one
    # sweep), at the cost of one more trial instead of a sweep of its own.
    total = LR_TRIALS + 2
    args = (*args, "--trials", total, f"--config.checkpoint.every_steps={BUDGET}")
    procs = [subprocess.Popen(_cmd(wd, *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _study(storage).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == total and not [t for t in trials if t.state.name == "RUNNING"], outs
    assert len({t.number for t in trials}) == len(trials)
    # Two processes that ask at one moment may overshoot by one trial, closed before it trains (`surplus`). Any
    # other failed row is the killed trial: failed once, by one of the two, and re-run under a new number.
    failed = [t for t in trials if t.state.name == "FAIL" and not t.user_attrs.get("surplus")]
    assert [t.number for t in failed] == [LR_TRIALS], [(t.number, t.state.name, t.user_attrs) for t in trials]
    retries = [t for t in done if t.user_attrs["workdir"] == str(killed)]
    assert len(retries) == 1 and retries[0].number > LR_TRIALS and retries[0].params == failed[0].params
    # One folder per finished trial: no trial trained twice, and the retry trained in the killed trial's folder.
    folders = sorted(p.name for p in (wd / "trials").iterdir())
    assert folders == sorted(Path(t.user_attrs["workdir"]).name for t in done)
    assert "restored checkpoint step" in (killed / "train.log").read_text()  # it resumed, not restarted
    for _, err in outs:
        assert f"resuming: {LR_TRIALS} of {total} trials already finished" in err, outs
        assert re.search(r"kslm: trial \d{3} \(", err), outs  # each process ran a trial: the study was shared
    assert not (wd / "sweep.db").exists()  # the study lives in --storage, not in the workdir


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


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_processes_sharing_a_study_draw_their_own_values(sampler, tmp_path):
    """Two sweep processes started together on one study, both with --seed 0 (two Sweep objects here, as each
    process builds one): their trials draw different values, and a trial's values are its number's, whichever
    process made it. Seeding each process with seed + trials so far gave both the same first draw."""
    cfg = config_lib.load("tiny_ko")
    params = sweep_space.parse_all(cfg, ["optim.lr=loguniform(1e-5,1e-1)", "train.batch_size=int(4,64)"])
    args = SimpleNamespace(workdir=str(tmp_path), budget_steps=10, heartbeat=1, pruner="none", study="s", seed=0,
                           sampler=sampler)

    def draws(db, order):
        procs = [sweep_lib.Sweep(args, cfg, params, f"sqlite:///{tmp_path / db}") for _ in range(2)]
        return {(t := procs[i].study.ask()).number: procs[i]._draw(t) for i in order}

    first = draws("a.db", [0, 1, 1])
    assert len({tuple(v.values()) for v in first.values()}) == 3, first
    assert draws("b.db", [1, 0, 0]) == first  # the other process first: each trial number draws the same values
