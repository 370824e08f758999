"""Where a train step's device time goes: trace a few steps and list the kernels by total time per step.

    python benchmarks/profile_step.py --preset gpt2-124m --batch 16 [--override model.attention=cudnn]

Reads the Perfetto trace that jax.profiler writes (no TensorBoard plugin needed).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import train_throughput as tt  # noqa: E402


# Kernel families by name (first match wins): cuBLAS/cuBLASLt and Triton GEMMs, cuDNN/tokamax attention,
# collectives, copies and transposes, then XLA's own fusions, which hold the elementwise and reduction passes.
CATEGORIES = [
    ("attention", r"flash|fmha|cudnn|mosaic|attention|splash|sdpa"),
    ("gemm", r"gemm|xmma|nvjet|cutlass|sm90_|ampere_|matmul|dot"),
    ("collective", r"nccl|all_reduce|all-reduce|reduce_scatter|all_gather"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("reduction fusion", r"reduce|reduction"),
    ("elementwise fusion", r"fusion|loop_|elementwise|convert|multiply|add"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, low)), "other")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--preset", choices=sorted(tt.PRESETS), default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--override", action="append", default=[])
    args = ap.parse_args()
    cfg = tt.build_config(args)
    s = tt.setup(cfg, args.batch)
    state, step_fn = s["state"], s["step_fn"]
    with jax.set_mesh(s["mesh"]):
        for i in range(3):
            state, out = step_fn(state, s["batches"][i % 2], None)
        jax.block_until_ready(out)
        logdir = tempfile.mkdtemp()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for i in range(args.steps):
                state, out = step_fn(state, s["batches"][i % 2], None)
            jax.block_until_ready(out)
    trace = next(Path(logdir).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
    device_pids = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n}
    if not device_pids:
        print(f"no accelerator in the trace; processes: {sorted(set(names.values()))[:10]}")
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            totals[e["name"]] += e.get("dur", 0)
            counts[e["name"]] += 1
    total = sum(totals.values())
    print(f"device processes: {[names[p] for p in device_pids]}")
    print(f"device busy per step: {total / args.steps / 1e3:.2f} ms over {len(totals)} kernel names")
    print(f"{'ms/step':>9s}{'share':>7s}{'calls':>7s}  kernel")
    for name, us in totals.most_common(args.top):
        print(f"{us / args.steps / 1e3:>9.3f}{us / total:>7.1%}{counts[name] // args.steps:>7d}  {name[:110]}")
    by_cat, n_cat = collections.Counter(), collections.Counter()
    for name, us in totals.items():
        by_cat[category(name)] += us
        n_cat[category(name)] += counts[name]
    print(f"\n{'ms/step':>9s}{'share':>7s}{'calls':>7s}  family")
    for cat, us in by_cat.most_common():
        print(f"{us / args.steps / 1e3:>9.3f}{us / total:>7.1%}{n_cat[cat] // args.steps:>7d}  {cat}")


if __name__ == "__main__":
    main()
