"""Fault injection beyond what CI runs, with a table of what was injected and what survived.

    python benchmarks/faults.py                # kill -9 x 20, five disk-full levels, 3 concurrency trials
    python benchmarks/faults.py --kills 5 --disk-levels 2 --races 1    # a shorter pass

Rows:
- kill -9 during training (tests/faults/test_kill.py with KSLM_FAULT_REPEATS=N): each trial kills
  `kslm train` at a random moment (most land mid-save), resumes, and compares the final parameters with an
  uninterrupted run bit for bit;
- corruption: every damage case of tests/faults (damaged, foreign, half-sealed and unsealed checkpoint steps,
  a changed config, damaged token shards and manifests), one row per case;
- concurrency: two `kslm train` on one workdir started together; exactly one may run, the other must
  get one line naming the holder, and no temporary folder may be left;
- disk full: a size-capped tmpfs filled to leave L KiB, then `kslm train` past its last checkpoint; it
  must end in one line, keep every earlier checkpoint, and resume to the end once space is freed;
- hostile imports: every hostile Hugging Face config and tensor case of tests/faults, one row per case.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORRUPTION = ["tests/faults/test_damaged_checkpoint.py", "tests/faults/test_checkpoint_steps.py",
              "tests/faults/test_corrupt_shards.py",
              "tests/faults/test_hostile_input.py::test_garbage_token_manifest_is_one_line",
              "tests/faults/test_hostile_input.py::test_flipped_shard_without_verification_is_one_line",
              "tests/faults/test_hostile_input.py::test_zeroed_unsealed_step_falls_back_without_tracebacks"]
IMPORTS = ["tests/faults/test_hostile_input.py", "-k", "hostile_config or wrong_tensor or retry_needs_no_force"]
TINY = ["--config", "tiny_ko", "--config.tokenizer.vocab_size=1000", "--config.model.d_model=64",
        "--config.model.n_layers=2", "--config.data.seq_len=64", "--config.train.batch_size=8",
        "--config.mesh.data=1", "--config.logging.progress_bar=false", "--config.checkpoint.every_steps=2"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


def kslm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kslm_jax", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900, **kw)


def _one_line(proc) -> bool:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kslm: error:")]
    return proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr


def pytest_cases(base: Path, name: str, targets: list[str], env: dict) -> list[tuple[str, bool]]:
    xml = base / f"{name}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, f"--junitxml={xml}",
                    f"--basetemp={base / name}"], cwd=REPO, env=env, capture_output=True, text=True)
    if not xml.is_file():
        return [(f"{name}: pytest did not run", False)]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        ok = case.find("failure") is None and case.find("error") is None
        rows.append((case.get("name"), ok))
    return rows


def prepared(base: Path) -> Path:
    wd = base / "prepared"
    for stage in ("prepare", "tokenizer", "tokenize"):
        proc = kslm(stage, "--workdir", wd, *(TINY if stage == "prepare" else []))
        if proc.returncode:
            sys.exit(f"{stage} failed:\n{proc.stderr[-2000:]}")
    return wd


def race(src: Path, base: Path, trial: int) -> tuple[str, bool]:
    wd = base / f"race-{trial}"
    shutil.copytree(src, wd)
    args = [sys.executable, "-m", "kslm_jax", "train", "--workdir", str(wd), "--config.train.steps=6"]
    procs = [subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    done = [p for p in procs if p.returncode == 0]
    refused = [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)
               if p.returncode != 0]
    leftovers = [p.name for p in (wd / "checkpoints").iterdir() if not p.name.isdigit()]
    ok = len(done) == 1 and len(refused) == 1 and _one_line(refused[0]) and "PID" in refused[0].stderr \
        and not leftovers
    return f"two `kslm train` started together (trial {trial})", ok


def disk_full(src: Path, base: Path, leave_kb: int) -> tuple[str, bool]:
    mnt = base / f"disk-{leave_kb}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True).returncode:
        return f"disk full leaving {leave_kb} KiB: cannot mount tmpfs (needs root)", False
    try:
        wd = mnt / "run"
        shutil.copytree(src, wd, ignore=shutil.ignore_patterns("checkpoints*"))
        if kslm("train", "--workdir", wd, "--config.train.steps=4").returncode:
            return f"disk full leaving {leave_kb} KiB: the first 4 steps failed", False
        before = sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(shutil.disk_usage(mnt).free - leave_kb * 1024, 0))
        full = kslm("train", "--workdir", wd, "--config.train.steps=10")
        clean = full.returncode == 0 or (_one_line(full) and "disk full" in full.stderr)
        # a run that had room finishes, and retention then drops old steps as it should
        kept = full.returncode == 0 or all((wd / "checkpoints" / s / "kslm_checksums.json").is_file() for s in before)
        filler.unlink()
        resumed = kslm("train", "--workdir", wd, "--config.train.steps=10")
        ok = clean and resumed.returncode == 0 and (wd / "checkpoints" / "10").is_dir() and kept
        how = "finished" if full.returncode == 0 else "one line" if clean else "NOT one line"
        return f"disk full leaving {leave_kb} KiB ({how}; resumed to 10)", ok
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--races", type=int, default=3)
    ap.add_argument("--disk-levels", type=int, default=5, help="how many of 40, 200, 600, 2000, 8000 KiB to run")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kslm-faults-"))
    env = dict(_env(), KSLM_FAULT_REPEATS=str(args.kills), KSLM_FAULT_DISK="1")
    groups = {}
    groups["kill -9"] = pytest_cases(base, "kill", ["tests/faults/test_kill.py"], env) if args.kills else []
    trials = [json.loads(p.read_text()) for p in base.rglob("kill-trial-*.json")]
    groups["corruption"] = pytest_cases(base, "corruption", CORRUPTION, env)
    src = prepared(base)
    groups["concurrency"] = [race(src, base, i) for i in range(args.races)]
    groups["concurrency"] += pytest_cases(base, "lock", ["tests/faults/test_workdir_lock.py::"
                                                         "test_second_writer_is_refused_while_the_first_holds_the_workdir"], env)
    groups["disk full"] = [disk_full(src, base, kb) for kb in (40, 200, 600, 2000, 8000)[: args.disk_levels]]
    groups["hostile import"] = pytest_cases(base, "imports", IMPORTS, env)
    print(f"\n{'group':15s} {'injected':88s} survived")
    for group, rows in groups.items():
        for name, ok in rows:
            print(f"{group:15s} {name[:88]:88s} {'yes' if ok else 'NO'}")
    print(f"\n{'group':15s} {'trials':>7s} {'survived':>9s}")
    for group, rows in groups.items():
        print(f"{group:15s} {len(rows):7d} {sum(ok for _, ok in rows):9d}")
    total = sum(len(r) for r in groups.values())
    survived = sum(ok for r in groups.values() for _, ok in r)
    print(f"{'total':15s} {total:7d} {survived:9d}")
    killed = sum(t["killed"] for t in trials)
    print(f"kill -9: {len(trials)} trials, {killed} killed mid-run, resumed from steps "
          f"{sorted({t['restored_from'] for t in trials}, key=lambda x: (x is None, x))}")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if survived == total else 1


if __name__ == "__main__":
    sys.exit(main())
