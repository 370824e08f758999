"""Many randomized fault injections, beyond what CI runs, with a summary table.

    python benchmarks/faults.py --kills 20

Runs tests/faults/test_kill.py with KSLM_FAULT_REPEATS=N (each trial: start `kslm train`, kill -9 at a
random moment, resume, compare the final parameters with an uninterrupted run bit for bit), plus the
damaged-checkpoint, disk-full, SIGTERM and non-finite suites once, and prints what was injected and lost.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITES = ["tests/faults/test_damaged_checkpoint.py", "tests/faults/test_disk_full.py", "tests/test_health.py",
          "tests/test_train.py::test_signal_saves_and_resume_is_bit_exact", "tests/faults/test_fuzz.py"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--fuzz-examples", type=int, default=2000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kslm-faults-"))
    env = dict(os.environ, KSLM_FAULT_REPEATS=str(args.kills), KSLM_FUZZ_EXAMPLES=str(args.fuzz_examples),
               KSLM_FAULT_DISK="1")
    rows = []
    for target in ["tests/faults/test_kill.py", *SUITES]:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target,
                               f"--basetemp={base / re.sub(r'[^A-Za-z0-9]+', '_', target)}"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
        rows.append((target, proc.returncode, tail))
    trials = [json.loads(p.read_text()) for p in base.rglob("kill-trial-*.json")]
    print(f"\n{'suite':60s} {'rc':>3s}  result")
    for target, rc, tail in rows:
        print(f"{target:60s} {rc:>3d}  {tail}")
    killed = sum(t["killed"] for t in trials)
    resumed_from = sorted({t["restored_from"] for t in trials}, key=lambda x: (x is None, x))
    print(f"\nkill -9 trials: {len(trials)} run, {killed} killed mid-run, resumed from steps {resumed_from}; "
          f"every trial's final parameters equal the uninterrupted run's: {all(rc == 0 for _, rc, _ in rows[:1])}")
    return 0 if all(rc == 0 for _, rc, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
