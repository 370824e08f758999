"""Fine-tuning on Korean data, measured: sentiment (full and LoRA) on NSMC held out by movie, SFT on chat QA.

    python benchmarks/finetune_nsmc.py                  # one GPU, ~7 minutes: the measurement
    python benchmarks/finetune_nsmc.py --base WORKDIR   # reuse a pretrained base (tokenizer with the chat markers)
    python benchmarks/finetune_nsmc.py --smoke          # CPU, tiny models on a 20k-review subset: the same stages

Every stage is the `kslm` command a user would type (printed before it runs):
1. the base: prepare (held out by movie_id), tokenizer (with <|user|>, <|assistant|>, <|end|>), tokenize and
   pretrain configs/finetune_nsmc_base.py on the NSMC reviews;
2. sentiment (rating ≥ 9 positive, ≤ 4 negative; 5-8 left out) on the same held-out movies: full fine-tuning
   (configs/cls_nsmc.py), LoRA on a float32 base and on an int8 base (configs/lora_nsmc.py), same steps;
3. SFT on ../shared/data/ko/chatbot_qa.csv (configs/sft_chatbot.py): held-out answer perplexity, and ROUGE-L
   and BLEU (characters, whitespace removed) of greedy answers.
Reported per run: accuracy and macro-F1 (or answer perplexity and ROUGE-L), trainable parameters, bytes of
parameters + optimizer state, the device's peak memory (GPU only), and step time (median over the logged
intervals after the first, which holds compilation). One table, printed and written to $OUT/finetune_nsmc.md
and .json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from stages import DATA_DIRS, REPO, device_name, flags, fresh, run, subset, timings, write_out

SMOKE_BASE = ["tokenizer.vocab_size=2000", "data.seq_len=128", "train.batch_size=16", "model.d_model=64",
              "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192", "model.dtype=float32",
              "model.attention=xla", "model.scan_layers=true", "data.workers=0", "train.steps=150",
              "checkpoint.every_steps=150", "optim.warmup_steps=10", "train.log_every=25"]
SMOKE_FT = ["model.dtype=float32", "model.attention=xla", "data.seq_len=64", "train.batch_size=16",
            "train.steps=60", "checkpoint.every_steps=60", "optim.warmup_steps=10", "train.log_every=10",
            "finetune.eval_examples=400", "logging.progress_bar=false"]
SMOKE_SFT = ["finetune.eval_generate=16", "finetune.max_new_tokens=24"]


def step_seconds(wd: Path) -> float | None:
    """Median step time over the logged intervals after the first (which includes compilation)."""
    from kslm_jax.core import config as config_lib
    cfg = config_lib.read_workdir_config(wd)
    rates = [r["perf/tokens_per_sec"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
             if "perf/tokens_per_sec" in r]
    if len(rates) < 2:
        return None
    return cfg.train.batch_size * cfg.data.seq_len / statistics.median(rates[1:])


def collect(wd: Path, seconds: float) -> dict:
    r = json.loads((wd / "eval" / "finetune.json").read_text())
    return {"eval": r["eval"], "params": r["params"], "peak_device_bytes": r["peak_device_bytes"],
            "step_seconds": step_seconds(wd), "steps": r["step"], "stage_seconds": seconds,
            "lora_rank": r["lora_rank"], "data": {k: {x: v for x, v in d.items() if x != "per_class"}
                                                  for k, d in r["data"].items()}}


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def table(title: str, base: dict, rows: dict, log: list, seconds: float, done: bool) -> str:
    out = [f"{title}; {seconds:.0f}s {'in all' if done else 'so far'}", ""]
    if base:
        out.append(f"base: held-out (other movies) LM loss {base['loss']:.4f}, {base['bits_per_char']:.4f} "
                   "bits/char\n")
    out += ["| run | held-out result | trainable params | params + optimizer MiB | frozen base MiB "
            "| peak device MiB | step ms | steps |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        e, p = r["eval"], r["params"]
        if "accuracy" in e:
            res = f"accuracy {e['accuracy']:.4f}, macro-F1 {e['macro_f1']:.4f} ({e['examples']:,} reviews)"
        else:
            res = (f"answer ppl {e['perplexity']:.2f}, ROUGE-L {e.get('rouge_l', float('nan')):.2f}, "
                   f"BLEU {e.get('bleu', float('nan')):.2f}")
        step = "n/a" if r["step_seconds"] is None else f"{1000 * r['step_seconds']:.1f}"
        out.append(f"| {name} | {res} | {p['trainable']:,} ({100 * p['trainable'] / p['total']:.2f}%) "
                   f"| {mib(p['param_bytes'] + p['optimizer_bytes'])} | {mib(p['frozen_bytes'])} "
                   f"| {mib(r['peak_device_bytes'])} | {step} | {r['steps']} |")
    out += timings(log)
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on a review subset, for a CPU")
    p.add_argument("--base", default=None, help="a pretrained workdir to fine-tune (skips stage 1)")
    p.add_argument("--runs", default=str(REPO / "runs" / "finetune_nsmc"), help="folder for the workdirs (replaced)")
    p.add_argument("--smoke-rows", type=int, default=20_000)
    p.add_argument("--data-dir", default=None, help="folder with nsmc_reviews.jsonl.gz and chatbot_qa.csv "
                                                    "(default: .devdata/, else ../shared/data/ko/)")
    args = p.parse_args()
    dirs = [Path(args.data_dir)] if args.data_dir else DATA_DIRS
    data = next((d for d in dirs if (d / "nsmc_reviews.jsonl.gz").is_file() and (d / "chatbot_qa.csv").is_file()),
                None)
    if data is None:
        sys.exit(f"nsmc_reviews.jsonl.gz and chatbot_qa.csv not found in {', '.join(map(str, dirs))}; pass --data-dir")
    nsmc, qa = data / "nsmc_reviews.jsonl.gz", data / "chatbot_qa.csv"
    runs = fresh(args.runs)
    if args.smoke:
        nsmc = subset(nsmc, runs / "nsmc_subset.jsonl.gz", args.smoke_rows)
    title = f"finetune_nsmc{' --smoke' if args.smoke else ''} on {device_name()}, reviews {nsmc.name}"
    log, rows, base_row, t0 = [], {}, {}, time.perf_counter()

    def report(done=False):
        text = table(title, base_row, rows, log, time.perf_counter() - t0, done)
        write_out("finetune_nsmc", text, {"title": title, "base": base_row, "rows": rows, "stages": log})
        return text

    base = Path(args.base).absolute() if args.base else runs / "base"
    if not args.base:
        base_cfg = [f"data.sources={nsmc}"] + (SMOKE_BASE if args.smoke else [])
        for stage in ("prepare", "tokenizer", "tokenize"):
            run([stage, "--config", "configs/finetune_nsmc_base.py", "--workdir", str(base), *flags(base_cfg)], log)
        run(["train", "--workdir", str(base)], log)
    if (base / "eval" / "lm.json").is_file():
        base_row = dict(json.loads((base / "eval" / "lm.json").read_text())["model"])
    report()

    ft = [f"finetune.init_from={base}"] + (SMOKE_FT if args.smoke else [])
    cls = ft + [f"finetune.train_files={nsmc}"]
    sft = ft + [f"finetune.train_files={qa}"] + (SMOKE_SFT if args.smoke else [])
    runs_spec = [
        ("sentiment, full fine-tune", "configs/cls_nsmc.py", cls),
        ("sentiment, LoRA r16 (float32 base)", "configs/lora_nsmc.py", cls),
        ("sentiment, LoRA r16 (int8 base)", "configs/lora_nsmc.py", cls + ["lora.base_dtype=int8"]),
        ("SFT chatbot QA, full fine-tune", "configs/sft_chatbot.py", sft),
    ]
    for i, (name, recipe, overrides) in enumerate(runs_spec):
        wd = runs / f"ft{i}"
        t = time.perf_counter()
        run(["train", "--config", recipe, "--workdir", str(wd), *flags(overrides)], log)
        rows[name] = collect(wd, time.perf_counter() - t)
        report()
    print("\n" + report(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
