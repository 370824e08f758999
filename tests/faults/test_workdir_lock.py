"""Issue 17 items 3 and 7, issue 20 points 1-2: one writer per workdir (the holder is a real second process), a
missing workdir or config.json is one line and writes nothing, and a failed first command leaves no config behind.
Refusals run `kslm` in the test process (tests/cli_inproc.py); what holds a lock or trains runs as a subprocess."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_without_clean
from cli_inproc import kslm
from one_line import one_line_error

import cpu_env

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--config.logging.progress_bar=false"]


def _env():
    return cpu_env.one_device_env(JAX_PLATFORMS="cpu")


def test_second_writer_is_refused_while_the_first_holds_the_workdir(prepared, tmp_path):
    wd = tmp_path / "run"
    copy_without_clean(prepared, wd)  # no end-of-train samples, which this test does not read
    env = dict(_env(), KSLM_FAULT_STALL_AT_STEP="1")  # the first run holds the lock, stalled after step 1
    first = subprocess.Popen([sys.executable, "-m", "kslm_jax", "train", "--workdir", str(wd),
                              "--config.train.steps=4", *QUIET], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (wd / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]
        before = sorted(p.name for p in (wd / "checkpoints").glob("*")) if (wd / "checkpoints").exists() else []
        # the refused commands run here: what matters is that the holder is another process
        second = kslm("train", "--workdir", wd, "--config.train.steps=4", *QUIET)
        one_line_error(second, "in use by", f"PID {first.pid}", "host")
        reader = kslm("eval", "--workdir", wd)  # a reader waits for no writer: it is refused too
        one_line_error(reader, f"PID {first.pid}")
        after = sorted(p.name for p in (wd / "checkpoints").glob("*")) if (wd / "checkpoints").exists() else []
        assert after == before and not list((wd / "checkpoints").glob("*tmp*"))
    finally:
        first.send_signal(signal.SIGKILL)  # the OS releases the flock of a killed holder
        first.communicate()
    # The holder is gone, so a writer gets the workdir; it needs no process of its own for that.
    third = kslm("train", "--workdir", wd, "--config.train.steps=2", *QUIET)
    assert third.returncode == 0, third.stderr[-2000:]


def test_missing_workdir_is_one_line_and_not_created(tmp_path):
    for command in ("tokenizer", "tokenize", "train", "eval", "generate", "export"):
        wd = tmp_path / f"typo-{command}"
        one_line_error(kslm(command, "--workdir", wd), "does not exist", str(wd))
        assert not wd.exists(), command


def test_missing_config_json_is_named_and_nothing_written(prepared, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    (wd / "config.json").unlink()
    before = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
    one_line_error(kslm("eval", "--workdir", wd), "has no config.json", str(wd))
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*")) == before


def test_failed_first_command_leaves_no_config(tmp_path):
    wd = tmp_path / "run"
    one_line_error(kslm("prepare", "--workdir", wd, "--config", "tiny_ko", "--config.data.sources=/nope/*.jsonl"))
    assert not (wd / "config.json").exists() and not wd.exists()
    wd.mkdir()
    (wd / "config.json").write_text('{"data": {"sources": "/nope/*.jsonl"}, "model": {"d_model": 96}}')
    # A config beside nothing else is a failed command's leftover: the corrected command is not refused.
    proc = kslm("prepare", "--workdir", wd, "--config", "tiny_ko", "--config.tokenizer.vocab_size=1000", *QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "holds another run's config" not in proc.stderr


def test_nan_in_a_stored_config_does_not_differ_from_itself():
    from kslm_jax.core import config as config_lib
    d = config_lib.to_dict(config_lib.base_config())
    d["optim"]["lr"] = float("nan")
    assert config_lib.breaking_differences(d, d) == []


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "optim.lr=-1", "train.steps=-5",
                                      "optim.b2=1.5", "checkpoint.every_steps=0", "model.rope_theta=-inf"])
def test_out_of_range_hyperparameters_are_refused(override):
    from kslm_jax.core import config as config_lib
    from kslm_jax.core.errors import KslmError
    with pytest.raises(KslmError, match=override.split("=")[0].replace(".", r"\.")):
        config_lib.load("tiny_ko", [override])
