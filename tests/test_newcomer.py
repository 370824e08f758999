"""A newcomer's first commands (issue 20), before any model exists: recipe and command-line mistakes, their own
jsonl with the wrong field, `kslm config --show`, the CPU recipe. Each runs `python -m kslm_jax` as a user does.

The "their own jsonl" records are the first NSMC reviews of ../shared/data/ko (a corpus the demo never sees).
"""
import gzip
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from extras import needs
from test_cli_errors import kslm, ok, user_error

from kslm_jax.core import config as config_lib
from kslm_jax.data import report as report_lib

REPO = Path(__file__).resolve().parents[1]
NSMC = REPO.parent / "shared" / "data" / "ko" / "nsmc_reviews.jsonl.gz"
RECIPE_HEAD = "from kslm_jax.core.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    if not NSMC.is_file():
        pytest.skip(f"{NSMC} not found")
    path = tmp_path_factory.mktemp("own") / "reviews.jsonl"
    with gzip.open(NSMC, "rt", encoding="utf-8") as f:
        path.write_text("".join(itertools.islice(f, 400)), encoding="utf-8")
    return path


def recipe(tmp_path, body: str, name: str = "mine.py") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE_HEAD + body, encoding="utf-8")
    return path


# ---------------------------------------------------------------- 3: recipe syntax errors

def test_recipe_syntax_error_is_file_line_message(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(RECIPE_HEAD + "    c.train.steps = (10\n    return c\n", encoding="utf-8")
    msg = user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "w"))
    assert re.search(rf"{re.escape(str(path))}:\d+: ", msg), msg
    assert not (tmp_path / "w").exists()


def test_recipe_runtime_error_names_its_line(tmp_path):
    path = recipe(tmp_path, "    c.train.steps = undefined_name\n    return c\n")
    msg = user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "w"), "NameError", "undefined_name")
    assert f"{path}:6:" in msg


# ---------------------------------------------------------------- 7: config typos

def test_recipe_key_typo_is_one_clean_line_with_a_suggestion(tmp_path):
    path = recipe(tmp_path, "    c.model.d_modl = 64\n    return c\n")
    msg = user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "w"), "'model.d_modl'",
                     "did you mean 'model.d_model'")
    assert f"{path}:6:" in msg
    assert "\\n" not in msg and "{" not in msg and "n_kv_heads" not in msg  # no repr of the whole section


def test_recipe_section_typo_lists_the_sections(tmp_path):
    path = recipe(tmp_path, "    c.modle.d_model = 64\n    return c\n")
    msg = user_error(kslm("prepare", "--config", path, "--workdir", tmp_path / "w"), "'modle'",
                     "did you mean 'model'")
    assert "sections: checkpoint, data" in msg and "tokenizer, train" in msg


@pytest.mark.parametrize("key, expected", [
    ("train.step", "did you mean 'train.steps'"),
    ("data.dedup.ngam", "did you mean 'data.dedup.ngram'"),
    ("trian.steps", "did you mean 'train'"),
])
def test_command_line_typo_suggests(tmp_path, key, expected):
    msg = user_error(kslm("prepare", "--workdir", tmp_path / "w", f"--config.{key}=3"), expected)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_command_line_unknown_section_lists_the_sections(tmp_path):
    msg = user_error(kslm("prepare", "--workdir", tmp_path / "w", "--config.zzz.steps=3"), "'zzz'")
    assert "sections: checkpoint, data, distill, eval" in msg


def test_unknown_key_with_nothing_close_lists_the_section():
    msg = config_lib.unknown_key_message("optim.", "qqqq")
    assert "did you mean" not in msg and "known in optim: b1, b2, eps" in msg


# ---------------------------------------------------------------- 4: a wrong data.text_field

def test_prepare_wrong_text_field_reports_counts_and_keys(tmp_path, reviews):
    msg = user_error(kslm("prepare", "--config", "cpu_jsonl", "--workdir", tmp_path / "w",
                          f"--config.data.sources={reviews}", "--config.data.text_field=body"),
                     "data.text_field 'body'", "missing from all 400 records")
    for key in ("id (400)", "movie_id (400)", "text (400)", "rating (400)"):
        assert key in msg, msg


def test_prepare_wrong_split_field_is_a_warning_with_a_suggestion(tmp_path, reviews):
    proc = ok(kslm("prepare", "--config", "cpu_jsonl", "--workdir", tmp_path / "w",
                   f"--config.data.sources={reviews}", "--config.data.split_field=movieid"))
    assert "warning: data.split_field 'movieid' is missing from all 400 records" in proc.stdout
    assert "did you mean 'movie_id'?" in proc.stdout
    report = json.loads((tmp_path / "w" / "data" / "clean" / "report.json").read_text(encoding="utf-8"))
    assert report["fields"]["split_field"]["missing"] == 400


def test_field_note_counts_a_partial_miss():
    info = dict(name="data.text_field", field="text", missing=3, records=10, sampled=10,
                keys={"text": 7, "body": 3})
    assert "missing from 3 of 10 records" in report_lib.field_note(info)


# ---------------------------------------------------------------- 6: config --show and the CPU recipe

def test_config_show_prints_every_key_value_and_comment(tmp_path):
    proc = ok(kslm("config", "--show", "--config", "cpu_jsonl", "--config.train.steps=123"))
    shown = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+)\s+= (.*?)(?:  # (.*))?$", line)
        if m:
            shown[m.group(1)] = (m.group(2), m.group(3))
    keys = config_lib.flat(config_lib.to_dict(config_lib.base_config()))
    assert set(shown) == set(keys)
    assert all(comment for _, comment in shown.values()), [k for k, (_, c) in shown.items() if not c]
    assert shown["train.steps"][0] == "123" and shown["data.text_field"][0] == "'text'"
    assert shown["model.d_model"] == ("128", "residual width (and the recurrent state's width)")
    assert "tokenizer keys replace this config's" in shown["finetune.init_from"][1]  # a comment over two lines
    assert not (tmp_path / "w").exists()


def test_config_show_reads_a_workdir_and_writes_nothing(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    cfg = config_lib.load(None, ["train.steps=77"])
    (wd / "config.json").write_text(cfg.to_json(indent=2), encoding="utf-8")
    before = (wd / "config.json").read_bytes()
    proc = ok(kslm("config", "--show", "--workdir", wd, "--config.optim.lr=0.5"))
    assert re.search(r"^train\.steps\s+= 77 ", proc.stdout, re.M)
    assert re.search(r"^optim\.lr\s+= 0\.5 ", proc.stdout, re.M)
    assert (wd / "config.json").read_bytes() == before and sorted(p.name for p in wd.iterdir()) == ["config.json"]
    user_error(kslm("config", "--show", "--workdir", tmp_path / "nope"), "does not exist")


def test_cpu_recipe_prepares_own_jsonl_split_by_a_field(tmp_path, reviews):
    ok(kslm("prepare", "--config", "cpu_jsonl", "--workdir", tmp_path / "w", f"--config.data.sources={reviews}",
            "--config.data.split_field=movie_id"))
    cfg = config_lib.load(str(REPO / "configs" / "cpu_jsonl.py"))
    assert cfg.data.text_field == "text" and cfg.train.steps <= 1000 and cfg.model.d_model <= 256
    clean = tmp_path / "w" / "data" / "clean"
    lines = reviews.read_text(encoding="utf-8").splitlines()
    movies = {}
    for split in ("train", "val"):
        for f in clean.glob(f"{split}-*.jsonl"):
            for line in f.read_text(encoding="utf-8").splitlines():
                lineno = int(json.loads(line)["id"].rsplit(":", 1)[1])
                movies.setdefault(json.loads(lines[lineno - 1])["movie_id"], set()).add(split)
    assert {"train"} in movies.values() and {"val"} in movies.values()
    assert all(len(s) == 1 for s in movies.values())  # no movie on both sides


@needs("export", "torch")
def test_cli_start_imports_neither_torch_nor_scipy():
    """Every `kslm` command starts by importing the CLI: tensorboardX would pull torch in (1.2 s) and the task
    metrics scipy.stats (0.5 s). Neither is needed to start, and the import system still finds both for the
    exporters and the task metrics: no None placeholder in sys.modules and no finder that hides them, which is
    how a CLI would keep them out. find_spec, not an import: the child took 4.5-4.8 s of CPU on 2 cores with
    both imports, 2.2 s without, and the export and task tests import both after the CLI in one process."""
    code = ("import sys, importlib.util, kslm_jax.cli.main; heavy = sorted({'torch', 'scipy'} & set(sys.modules)); "
            "assert not heavy, heavy; found = [importlib.util.find_spec(m) is not None for m in ('torch', 'scipy')]; "
            "assert found == [True, True], found; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
