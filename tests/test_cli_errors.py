"""`kslm` as a user runs it: help texts, and bad input that must end in one `kslm: error:` line and exit 2.

Every case stops before any training and runs `kslm` inside the test process (tests/cli_inproc.py), which saves
the two seconds a `python -m kslm_jax` spends on imports; one case runs a real subprocess, for the exit path a
user sees. The corpus is a few Korean sentences written for this file.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inproc import REPO, kslm

TINY_KO = str(REPO / "configs" / "tiny_ko.py")
COMMANDS = ("prepare", "tokenizer", "tokenize", "train", "eval", "generate", "demo", "distill-cache", "prune")

# About 300 characters in eight paragraphs (the default text_mode splits on blank lines).
KOREAN = """오늘은 날씨가 맑고 바람이 시원하게 불어서 공원에 산책을 나갔다.

나무 아래 벤치에 앉아 책을 읽으며 오후 시간을 조용히 보냈다.

저녁에는 친구와 함께 시장에 가서 따뜻한 국수를 한 그릇 먹었다.

집으로 돌아오는 길에 작은 빵집에 들러 내일 아침에 먹을 빵을 샀다.

밤하늘에 별이 많이 보여서 창문을 열고 한참 동안 바라보았다.

주말에는 가족들과 함께 바닷가로 여행을 떠날 계획을 세웠다.

도서관에서 빌린 역사 소설은 생각보다 훨씬 재미있어서 금방 다 읽었다.

아침 일찍 일어나 운동을 하고 나니 하루 종일 기분이 상쾌했다.
"""

# Small enough that every stage before training is quick; 500 pieces fit the corpus above.
SMALL = ["--config.tokenizer.vocab_size=500", "--config.model.d_model=64", "--config.model.n_layers=2",
         "--config.data.seq_len=32", "--config.train.batch_size=2", "--config.mesh.data=1",
         "--config.logging.progress_bar=false"]


def _describe(proc):
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def user_error(proc, *names) -> str:
    """Assert the run failed the way a user mistake must fail; return the error message."""
    assert proc.returncode == 2, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("kslm: error:"), _describe(proc)
    assert sum(line.startswith("kslm: error:") for line in lines) == 1, _describe(proc)
    msg = lines[-1]
    for name in names:
        assert str(name) in msg, f"{name!r} not in {msg!r}"
    return msg


def ok(proc):
    assert proc.returncode == 0, _describe(proc)
    return proc


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "ko.txt"
    path.write_text(KOREAN, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Workdirs stopped after each stage: config only, clean data, tokenizer, token shards."""
    root = tmp_path_factory.mktemp("stages")
    src = root / "ko.txt"
    src.write_text(KOREAN, encoding="utf-8")
    wd = root / "work"
    out = {}
    # config only: bind the workdir in-process, as every command does first
    from kslm_jax.core import config as config_lib
    from kslm_jax.core import workdir as workdir_lib
    cfg = config_lib.load(TINY_KO, [a[len("--config."):] for a in SMALL] + [f"data.sources={src}"])
    workdir_lib.bind(wd, cfg)
    out["config"] = root / "config_only"
    shutil.copytree(wd, out["config"])
    ok(kslm("prepare", "--workdir", wd))
    out["clean"] = root / "clean"
    shutil.copytree(wd, out["clean"])
    ok(kslm("tokenizer", "--workdir", wd))
    out["tokenizer"] = root / "tokenizer"
    shutil.copytree(wd, out["tokenizer"])
    ok(kslm("tokenize", "--workdir", wd))
    out["tokens"] = wd
    return out


# ---------------------------------------------------------------- help

@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_it_reads_and_writes(command):
    proc = ok(kslm(command, "--help"))
    assert "reads" in proc.stdout and "writes" in proc.stdout, proc.stdout
    assert f"kslm {command}" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_no_command_prints_the_command_list(args):
    proc = ok(kslm(*args))
    for command in COMMANDS:
        assert command in proc.stdout
    assert proc.stderr == ""


def test_unknown_command_exits_2():
    proc = kslm("trian", "--workdir", "x")
    user_error(proc, "trian")
    assert "train" in proc.stdout  # the command list, to pick the right one


def test_missing_workdir_is_an_argparse_error():
    proc = kslm("prepare", "--config", TINY_KO)
    assert proc.returncode == 2, _describe(proc)
    assert "--workdir" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- prepare

def test_prepare_pattern_matching_nothing(tmp_path):
    pattern = "/nonexistent/*.txt"
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run",
                    f"--config.data.sources={pattern}"), pattern, "data.sources")
    assert not (tmp_path / "run" / "data" / "clean").exists()


def test_real_process_fails_in_one_line(tmp_path):
    """The exit a user sees, which in-process cases replace with SystemExit: `_fail` closes fd 2 and os._exits."""
    pattern = "/nonexistent/*.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "kslm_jax", "prepare", "--config", TINY_KO, "--workdir",
                           str(tmp_path / "run"), f"--config.data.sources={pattern}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    user_error(proc, pattern, "data.sources")
    assert not (tmp_path / "run").exists()


def test_prepare_one_missing_file_among_several(tmp_path, corpus):
    missing = tmp_path / "gone.txt"
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run",
                    f"--config.data.sources={corpus},{missing}"), missing)


def test_prepare_directory_as_source(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run",
                    f"--config.data.sources={folder}"), folder)


@pytest.mark.parametrize("text", [
    "hello world\n",
    "hello world\n\nthis paragraph is English only and long enough\n\n   \n\n가\n",
    "   \n\n\t\n",
    "",
])
def test_prepare_nothing_left(tmp_path, text):
    src = tmp_path / "empty.txt"
    src.write_text(text, encoding="utf-8")
    wd = tmp_path / "run"
    msg = user_error(kslm("prepare", "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={src}"))
    assert "no documents left" in msg
    # nothing half-written for the next stage to pick up
    assert not (wd / "data" / "clean").exists()
    assert not list(wd.rglob(".clean.partial-*"))


def test_prepare_failure_keeps_earlier_clean_data(tmp_path, corpus):
    wd = tmp_path / "run"
    ok(kslm("prepare", "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={corpus}"))
    before = snapshot(wd / "data")
    empty = tmp_path / "empty.txt"
    empty.write_text("hello world\n", encoding="utf-8")
    # data.sources is a breaking key, so this needs --force; the failed prepare must still keep the old shards
    user_error(kslm("prepare", "--workdir", wd, f"--config.data.sources={empty}", "--force"), "no documents left")
    assert snapshot(wd / "data") == before


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_vocab_too_large_for_corpus(tmp_path, corpus):
    wd = tmp_path / "run"
    ok(kslm("prepare", "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={corpus}",
            "--config.tokenizer.vocab_size=8000"))
    clean = wd / "data" / "clean"
    assert (clean / "report.json").is_file() and list(clean.glob("train-*.jsonl"))
    before = snapshot(clean)
    msg = user_error(kslm("tokenizer", "--workdir", wd), "tokenizer.vocab_size")
    assert "8000" in msg
    assert snapshot(clean) == before
    assert not (wd / "tokenizer" / "spm.model").exists()
    assert not list((wd / "tokenizer").glob(".spm-*"))  # temporary training folder removed


def test_tokenizer_before_prepare(stages):
    user_error(kslm("tokenizer", "--workdir", stages["config"]), "kslm prepare")


def test_failed_tokenizer_leaves_no_temporary_folder(stages, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(stages["config"], wd)
    user_error(kslm("tokenizer", "--workdir", wd), "kslm prepare")
    assert not list(wd.rglob(".spm-*"))


# ---------------------------------------------------------------- config keys

@pytest.mark.parametrize("command", ["prepare", "tokenizer", "train"])
def test_unknown_config_key(tmp_path, command):
    if command != "prepare":  # only prepare (and import, demo) may start a workdir that does not exist
        (tmp_path / "run").mkdir()
    user_error(kslm(command, "--config", TINY_KO, "--workdir", tmp_path / "run", "--config.model.n_layerz=3"),
               "model.n_layerz")
    # refused before the workdir is touched
    assert not (tmp_path / "run").exists() if command == "prepare" else not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("args", [("--config.train.steps=many",), ("--config.train.steps", "many")])
def test_wrong_type_for_config_key(tmp_path, args):
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run", *args), "train.steps", "many")


def test_wrong_bool_for_config_key(tmp_path):
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run",
                    "--config.model.tie_embeddings=maybe"), "model.tie_embeddings")


def test_override_of_a_section(tmp_path):
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run", "--config.model=3"), "model")


def test_invalid_combination(tmp_path):
    user_error(kslm("prepare", "--config", TINY_KO, "--workdir", tmp_path / "run", "--config.model.n_kv_heads=3"),
               "model.n_kv_heads")


@pytest.mark.parametrize("name", ["missing.py", "missing"])
def test_missing_recipe_relative(tmp_path, name):
    user_error(kslm("prepare", "--config", name, "--workdir", tmp_path / "run"), name)


def test_missing_recipe_absolute(tmp_path):
    path = tmp_path / "missing.py"
    user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "run"), path)


def test_recipe_with_unknown_key(tmp_path):
    path = tmp_path / "bad_recipe.py"
    path.write_text("from kslm_jax.core.config import base_config\ndef get_config():\n c=base_config(); c.model.foo=1; "
                    "return c\n", encoding="utf-8")
    user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "run"), path, "foo")


def test_corrupt_workdir_config(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text("{oops", encoding="utf-8")
    user_error(kslm("prepare", "--workdir", wd), wd / "config.json")
    assert (wd / "config.json").read_text(encoding="utf-8") == "{oops"


def test_no_config_anywhere(tmp_path):
    # no --config and no config.json: base_config() with empty data.sources
    user_error(kslm("prepare", "--workdir", tmp_path / "run"), "data.sources")


# ---------------------------------------------------------------- workdir

def test_workdir_of_another_run(tmp_path, corpus):
    wd = tmp_path / "run"
    ok(kslm("prepare", "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={corpus}",
            "--config.data.min_chars=4"))
    config_before = (wd / "config.json").read_bytes()
    data_before = snapshot(wd / "data")
    msg = user_error(kslm("prepare", "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={corpus}",
                          "--config.data.min_chars=6"), "data.min_chars", wd)
    assert "4" in msg and "6" in msg
    assert (wd / "config.json").read_bytes() == config_before
    assert snapshot(wd / "data") == data_before
    # the same change through the workdir's own config
    user_error(kslm("prepare", "--workdir", wd, "--config.data.min_chars=6"), "data.min_chars")
    assert (wd / "config.json").read_bytes() == config_before
    # a harmless change is fine, and --force takes the breaking one
    ok(kslm("prepare", "--workdir", wd, "--config.train.steps=3"))
    ok(kslm("prepare", "--workdir", wd, "--config.data.min_chars=6", "--force"))
    assert '"min_chars": 6' in (wd / "config.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["prepare", "tokenizer", "train"])
def test_unwritable_workdir(tmp_path, corpus, command):
    (tmp_path / "afile").write_text("not a folder", encoding="utf-8")
    wd = tmp_path / "afile" / "run"
    msg = user_error(kslm(command, "--config", TINY_KO, "--workdir", wd, f"--config.data.sources={corpus}"), wd)
    assert "workdir" in msg
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "not a folder"


# ---------------------------------------------------------------- stages out of order

@pytest.mark.parametrize("stage, command, hint", [
    ("config", "tokenize", "kslm tokenizer"),
    ("clean", "tokenize", "kslm tokenizer"),
    ("config", "train", "kslm tokenizer"),
    ("clean", "train", "kslm tokenizer"),
    ("tokenizer", "train", "kslm tokenize"),
    ("config", "eval", "kslm tokenize"),
    ("tokenizer", "eval", "kslm tokenize"),
    ("tokens", "eval", "kslm train"),
    ("tokens", "generate", "kslm train"),
])
def test_stage_run_too_early(stages, tmp_path, stage, command, hint):
    wd = tmp_path / "run"
    shutil.copytree(stages[stage], wd)
    before = snapshot(wd)
    msg = user_error(kslm(command, "--workdir", wd), hint)
    assert str(wd) in msg
    assert "first" in msg
    assert snapshot(wd) == before  # failing early writes nothing (config.json is rewritten identically)
    assert not (wd / "checkpoints").exists()
