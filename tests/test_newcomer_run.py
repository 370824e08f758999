"""A newcomer's first trained model (issue 20): generate's sampling flags and held-out prompts, the end-of-train
table, TensorBoard (HParams, samples, the unigram line, `kslm eval`), progress bars on a terminal only, the
chance level of a task, and a failed hf export. The model is the suite's tiny one on the bundled corpus.
"""
import fcntl
import os
import pty
import re
import shutil
import struct
import sys
import termios
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY
from test_cli_errors import kslm, ok, user_error

import cpu_env

from kslm_jax.cli import commands
from kslm_jax.eval import runner

REPO = Path(__file__).resolve().parents[1]
KORNLI = REPO.parent / "shared" / "data" / "ko" / "kornli_xnli_dev.tsv"


def _copy(trained_tiny, tmp_path) -> Path:
    wd = tmp_path / "run"
    shutil.copytree(trained_tiny.workdir, wd)
    return wd


def _generate(wd, capsys, **flags) -> str:
    args = dict(workdir=str(wd), config=None, force=False, prompt=[], quant=[], max_new_tokens=None,
                temperature=None, top_p=None, num_samples=None, seed=None)
    args.update(flags)
    capsys.readouterr()
    assert commands.generate(SimpleNamespace(**args), []) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_generate_flags_and_prompts_from_the_held_out_split(trained_tiny, tmp_path, capsys):
    wd = _copy(trained_tiny, tmp_path)
    out = _generate(wd, capsys, max_new_tokens=6, temperature=0.0, num_samples=2)
    greedy = re.findall(r"^\[(\d)\] (.*?)(?=\n\[\d\] |\Z)", out, re.M | re.S)  # a sample may hold newlines
    assert [k for k, _ in greedy] == ["1", "2"] * 3, out
    assert all(greedy[i][1] == greedy[i + 1][1] for i in (0, 2, 4))  # temperature 0: both samples greedy
    val = " ".join((wd / "data" / "clean").glob("val-*.jsonl").__next__().read_text(encoding="utf-8").split())
    for _, text in greedy[::2]:
        assert text.split()[0] in val, text  # each prompt opens a held-out document
    assert not any(text.startswith(p) for _, text in greedy for p in commands.DEMO_PROMPTS)
    a = _generate(wd, capsys, prompt=["국회는"], max_new_tokens=12, seed=5, top_p=0.9)
    b = _generate(wd, capsys, prompt=["국회는"], max_new_tokens=12, seed=5, top_p=0.9)
    short = _generate(wd, capsys, prompt=["국회는"], max_new_tokens=1, seed=5, top_p=0.9)
    assert a == b and a.startswith("국회는") and not a.startswith("[1]")
    sp = trained_tiny.sp
    assert len(sp.EncodeAsIds(short)) <= len(sp.EncodeAsIds("국회는")) + 1 < len(sp.EncodeAsIds(a))
    with pytest.raises(Exception, match="--top-p must be in"):
        _generate(wd, capsys, top_p=1.5)


def test_export_hf_without_safetensors_is_one_line_and_leaves_no_folder(trained_tiny, tmp_path, monkeypatch):
    wd = _copy(trained_tiny, tmp_path)
    # None in sys.modules makes every import of it fail, as on an install without the package; kslm_jax imports
    # safetensors only inside the functions that use it, so nothing imported before this test holds it either.
    for name in ("safetensors", "safetensors.numpy"):
        monkeypatch.setitem(sys.modules, name, None)
    user_error(kslm("export", "--workdir", wd, "--format", "hf"), "safetensors", "pip install")
    assert not (wd / "export").exists()


def test_train_ends_with_the_table_and_tensorboard_shows_the_run(workdir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = SimpleNamespace(workdir=str(workdir), config=None, force=False)
    assert commands.train(args, TINY + ["train.eval_every=10"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("before training"):]
    assert "after training (step 20)" in table and "unigram (train split)" in table
    assert re.search(r"the trained model (beats|does NOT beat) the unigram model", table)
    lm = __import__("json").loads((workdir / "eval" / "lm.json").read_text())
    assert lm["before"]["bits_per_char"] > lm["model"]["bits_per_char"]

    def run(name):
        acc = EventAccumulator(str(workdir / "tensorboard" / name))
        acc.Reload()
        return acc

    hp = run("hparams")
    assert set(hp.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = hp.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"model.d_model" in start and b"optim.lr" in start
    assert hp.Scalars("hparam/bits_per_char")[-1].value == pytest.approx(lm["model"]["bits_per_char"], rel=1e-5)
    samples = run("samples")
    assert [e.step for e in samples.Tensors("samples/text_summary")] == [10, 20]
    assert "**" in samples.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    unigram = run("unigram").Scalars("eval/bits_per_char")
    assert [e.step for e in unigram] == [0, 10, 20]
    assert all(e.value == pytest.approx(lm["unigram"]["bits_per_char"], rel=1e-5) for e in unigram)

    args = SimpleNamespace(workdir=str(workdir), config=None, force=False, quant=[], tasks=None)
    assert commands.eval_(args, []) == 0
    ev = run("eval")
    assert ev.Scalars("eval/bits_per_char")[-1].step == 20
    assert ev.Scalars("eval/unigram_bits_per_char")[-1].value == pytest.approx(lm["unigram"]["bits_per_char"], rel=1e-5)


def _on_a_terminal(*commands) -> str:
    """The `kslm` commands, one after another in one fresh process, on a pseudo-terminal 150 columns wide (tqdm
    draws nothing into zero columns); one process rather than one per command saves their imports."""
    script = ("from kslm_jax.cli import main\n"
              f"for argv in {[list(map(str, c)) for c in commands]!r}:\n"
              "    try:\n        main.main(argv)\n"
              "    except SystemExit as e:\n        if e.code:\n            raise\n")
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-c", script], cpu_env.one_device_env(JAX_PLATFORMS="cpu"))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    return out.decode("utf-8", "replace")


@pytest.mark.skipif(not KORNLI.is_file(), reason="KorNLI test file not found")
def test_progress_bars_on_a_terminal_and_silent_in_a_pipe(trained_tiny, tmp_path):
    wd = _copy(trained_tiny, tmp_path)
    shown = _on_a_terminal(("prepare", "--workdir", wd), ("tokenize", "--workdir", wd), ("eval", "--workdir", wd),
                           ("eval", "--workdir", wd, "--tasks", f"kornli={KORNLI}", "--limit", "24"))
    # elapsed<remaining: a stage shorter than the bar's refresh interval shows only its first frame, "<?".
    eta = r"\[\d\d:\d\d<(?:\d\d:\d\d|\?)"
    assert re.search(r"prepare \(\d+ files\): .*doc/s", shown), shown[-3000:]
    assert re.search(rf"tokenize: .*{eta}, .*B/s\]", shown), shown[-3000:]
    assert re.search(rf"eval: .*{eta}, .*tok/s\]", shown), shown[-3000:]
    assert re.search(rf"kornli: .*{eta}, .*seq/s\]", shown), shown[-3000:]
    piped = ok(kslm("eval", "--workdir", wd, "--tasks", f"kornli={KORNLI}", "--limit", "24"))
    assert "seq/s" not in piped.stderr + piped.stdout and "it/s" not in piped.stderr
    assert re.search(r"kornli\s+24 .*\(chance 0\.3333\)", piped.stdout), piped.stdout


def test_task_table_warns_when_every_prediction_is_one_class():
    gold = [0, 1, 2, 0]
    one = {"n": 4, "accuracy": 0.5, "chance": 1 / 3, **runner._one_class([0, 0, 0, 0], gold, "choice")}
    varied = {"n": 4, "accuracy": 0.5, "chance": 1 / 3, **runner._one_class([0, 1, 0, 0], gold, "choice")}
    text = runner.table({"one": one, "varied": varied})
    assert "warning: one: every prediction is choice 0 (its share of the gold labels: 0.500)" in text
    assert "warning: varied" not in text and text.count("(chance 0.3333)") == 2
