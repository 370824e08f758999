"""What the stage-running benchmarks share: run a `kslm` command as a user would, find the data, write $OUT.

The benchmarks (distill_nsmc, finetune_nsmc, tokenizers) run each stage as a child process, so the parent
never starts JAX and the device stays with the stage that trains.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))
# .devdata/ (ignored by git) carries the files to a machine that has no ../shared beside the checkout.
DATA_DIRS = (REPO / ".devdata", REPO.parent / "shared" / "data" / "ko")


def find_data(name: str, given: str | None = None) -> Path:
    """`given`, or `name` in the first of DATA_DIRS that has it; exits with one line when none does."""
    path = Path(given) if given else next((d / name for d in DATA_DIRS if (d / name).is_file()), None)
    if path is None or not path.is_file():
        sys.exit(f"{name} not found (tried {given or ', '.join(str(d / name) for d in DATA_DIRS)}); pass its path")
    return path.absolute()


def run(cmd: list[str], log: list) -> float:
    """Run one kslm command, streaming its output; its wall time goes to `log` and is returned."""
    shown = " ".join(cmd)
    print(f"\n$ kslm {shown}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kslm_jax", *cmd], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - t0
    log.append({"command": "kslm " + shown, "seconds": round(seconds, 1)})
    print(f"  ({seconds:.0f}s)", flush=True)
    return seconds


def timings(log: list) -> list[str]:
    """The closing lines of a report: each stage's seconds and the command `run` ran."""
    return ["", "stages:"] + [f"- {e['seconds']:>6.1f}s  {e['command']}" for e in log]


def flags(overrides: list[str]) -> list[str]:
    return [f"--config.{o}" for o in overrides]


def subset(src: Path, dst: Path, rows: int) -> Path:
    """The first `rows` lines of a .jsonl.gz, for the CPU smoke runs."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as fin, gzip.open(dst, "wt", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= rows:
                break
            fout.write(line)
    return dst


def link_tree(src: Path, dst: Path) -> None:
    """A copy of a folder made of hard links (real copies across filesystems): workdirs share big files."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def device_name() -> str:
    """The accelerator, asked in a child process that exits (and frees the device) before the stages start."""
    code = "import jax; d = jax.devices()[0]; print(f'{d.device_kind} ({d.platform})')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() or "unknown device"


def write_out(name: str, text: str, data: dict) -> None:
    """$OUT/<name>.md and .json, when OUT is set (the device machine sends $OUT back)."""
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.md").write_text(text)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))


def fresh(folder: str) -> Path:
    """`folder`, emptied: a benchmark's runs never mix with an earlier one's."""
    path = Path(folder).absolute()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
