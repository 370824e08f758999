"""What FP8 matmuls cost in quality: the same 124M model trained in bf16 and in `model.matmul_precision=fp8`.

    python benchmarks/fp8_quality.py                # one GPU (Hopper for real FP8 GEMMs): 2,000 steps each
    python benchmarks/fp8_quality.py --smoke        # CPU, a tiny model on 20k reviews: the same stages

Both runs read the same tokenizer and token shards (NSMC reviews, held out by movie_id), start from the same
seed and see the same batches, so the two loss curves differ only by the FP8 rounding. Every stage is the
`kslm` command a user would type (printed before it runs). One table of training loss (mean over each
reporting window), held-out loss at each evaluation, and tokens/s (median of the windows after the first),
printed and written to $OUT/fp8_quality.md and .json when OUT is set. This is the check benchmarks/README.md
asks of an FP8 throughput row: a ratio against a peer counts only if the curves match.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, link_tree, run, subset, timings, write_out

RECIPE = "configs/ko_125m.py"
SMOKE = ["tokenizer.vocab_size=2000", "data.seq_len=128", "model.d_model=64", "model.n_layers=2",
         "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192", "model.dtype=float32", "model.attention=xla",
         "data.workers=0"]


def curve(wd: Path) -> dict:
    """{"train": {step: loss}, "eval": {step: loss}, "tokens_per_sec": median rate after the first window}."""
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r]
    return {"train": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
            "eval": {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r},
            "tokens_per_sec": statistics.median(rates[1:]) if len(rates) > 1 else None}


def table(title: str, curves: dict, log: list, seconds: float) -> str:
    out = [f"{title}; {seconds:.0f}s{' so far' if len(curves) < 2 else ''}", ""]
    if len(curves) == 2:
        (_, a), (low, b) = curves.items()  # bf16 first, then the FP8 run
        for kind in ("train", "eval"):
            steps = sorted(set(a[kind]) & set(b[kind]))
            if kind == "train" and len(steps) > 12:  # every window is in the .json; the table shows a dozen
                steps = [steps[round(i * (len(steps) - 1) / 11)] for i in range(12)]
            out += [f"{kind} loss:", "", f"| step | bf16 | {low} | {low} - bf16 | relative |", "|---|---|---|---|---|"]
            out += [f"| {s} | {a[kind][s]:.4f} | {b[kind][s]:.4f} | {b[kind][s] - a[kind][s]:+.4f} "
                    f"| {100 * (b[kind][s] - a[kind][s]) / a[kind][s]:+.2f}% |" for s in steps]
            out.append("")
    for name, c in curves.items():
        rate = c["tokens_per_sec"]
        out.append(f"{name}: {'n/a' if rate is None else f'{rate:,.0f}'} tokens/s (median after the first window)")
    return "\n".join(out + timings(log)) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny model on a 20k-review subset, for a CPU")
    p.add_argument("--data", default=None, help="nsmc_reviews.jsonl.gz (default: .devdata/ or ../shared/data/ko/)")
    p.add_argument("--runs", default=str(REPO / "runs" / "fp8_quality"), help="folder for the workdirs (replaced)")
    p.add_argument("--steps", type=int, default=None, help="default 2000 (smoke: 60)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--smoke-rows", type=int, default=20_000)
    p.add_argument("--precision", choices=("fp8", "fp8_delayed"), default="fp8",
                   help="the model.matmul_precision set against bf16 (fp8: current scaling; fp8_delayed: amax history)")
    args = p.parse_args()

    data = find_data("nsmc_reviews.jsonl.gz", args.data)
    runs = fresh(args.runs)
    if args.smoke:
        data = subset(data, runs / "nsmc_subset.jsonl.gz", args.smoke_rows)
    steps = args.steps or (60 if args.smoke else 2000)
    every = max(steps // 80, 5)
    common = [f"data.sources={data}", "data.split_field=movie_id", "tokenizer.vocab_size=16000",
              "tokenizer.sample_sentences=300000", f"train.batch_size={args.batch}", f"train.steps={steps}",
              f"optim.warmup_steps={max(steps // 10, 5)}", f"train.log_every={every}",
              f"train.eval_every={max(steps // 4, every)}", "train.eval_batches=20",
              f"checkpoint.every_steps={steps}", "logging.progress_bar=false"] + (SMOKE if args.smoke else [])
    title = (f"fp8_quality{' --smoke' if args.smoke else ''} on {device_name()}: {RECIPE}, batch {args.batch}, "
             f"{steps} steps, NSMC held out by movie_id")
    fp8 = args.precision
    title += f", bf16 against {fp8}"
    wd = {"bf16": runs / "bf16", fp8: runs / fp8}
    log, curves, t0 = [], {}, time.perf_counter()

    def report():
        text = table(title, curves, log, time.perf_counter() - t0)
        write_out("fp8_quality", text, {"title": title, "curves": curves, "stages": log})
        return text

    for stage in ("prepare", "tokenizer", "tokenize"):
        run([stage, "--config", RECIPE, "--workdir", str(wd["bf16"]), *flags(common)], log)
    wd[fp8].mkdir()
    for sub in ("tokenizer", "data/tokens"):
        link_tree(wd["bf16"] / sub, wd[fp8] / sub)
    # bf16 trains with the config its workdir's stages saved; fp8 with the same keys plus its one change
    for name, cmd in (("bf16", ["train", "--workdir", str(wd["bf16"])]),
                      (fp8, ["train", "--config", RECIPE, "--workdir", str(wd[fp8]),
                             *flags(common + [f"model.matmul_precision={fp8}"])])):
        run(cmd, log)
        curves[name] = curve(wd[name])
        report()
    print("\n" + report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
