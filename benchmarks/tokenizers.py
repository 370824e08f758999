"""Which tokenizer for Korean? BPE, unigram and Kiwi-morpheme BPE at 16k and 32k pieces, on NSMC reviews.

    python benchmarks/tokenizers.py --fertility-only   # any machine: train the tokenizers, fertility table
    python benchmarks/tokenizers.py                    # one GPU: + a small LM per tokenizer, held-out bits/char
    python benchmarks/tokenizers.py --reuse runs/tokenizers --variants bpe16k,kiwi16k   # LMs on tokenizers
                                                       # trained earlier (e.g. on a CPU box), no retraining
    python benchmarks/tokenizers.py --smoke            # CPU: 20k reviews, 2k/4k pieces, tiny LMs

Every stage is the `kslm` command a user would type (printed before it runs):
1. prepare the reviews once (held out by movie_id: no movie on both sides); every variant's workdir gets
   the same clean shards (hard links);
2. per variant, `kslm tokenizer` (or the --reuse'd model) and `kslm tokenizer --report`: tokens per character,
   per eojeol and per byte on the held-out reviews, byte-fallback rate, vocabulary used;
3. unless --fertility-only, `kslm tokenize` and `kslm train --config configs/tokenizer_nsmc.py`: the same model
   shape, steps and batch for every variant (so the same number of *tokens*, which is the same compute but
   not the same text: a tokenizer with fewer tokens per character sees more of the corpus), then the
   held-out loss in bits per character from eval/lm.json, which every tokenizer can be compared on.
One table, printed and written to $OUT/tokenizers.md and .json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, link_tree, run, subset, write_out

RECIPE = "configs/tokenizer_nsmc.py"
VARIANTS = {  # name: tokenizer keys
    "bpe16k": dict(vocab_size=16000, model_type="bpe", pretokenize="none"),
    "unigram16k": dict(vocab_size=16000, model_type="unigram", pretokenize="none"),
    "kiwi16k": dict(vocab_size=16000, model_type="bpe", pretokenize="kiwi"),
    "bpe32k": dict(vocab_size=32000, model_type="bpe", pretokenize="none"),
    "unigram32k": dict(vocab_size=32000, model_type="unigram", pretokenize="none"),
    "kiwi32k": dict(vocab_size=32000, model_type="bpe", pretokenize="kiwi"),
}
SMOKE_SIZES = {16000: 2000, 32000: 4000}
SMOKE_LM = ["data.seq_len=128", "train.batch_size=16", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=1", "model.d_ff=192", "model.dtype=float32", "model.attention=xla",
            "model.scan_layers=true", "data.workers=0", "train.steps=60", "checkpoint.every_steps=60",
            "optim.warmup_steps=10", "train.log_every=20", "logging.progress_bar=false"]


def tokenizer_keys(name: str, smoke: bool) -> list[str]:
    keys = dict(VARIANTS[name])
    if smoke:
        keys["vocab_size"] = SMOKE_SIZES[keys["vocab_size"]]
    return [f"tokenizer.{k}={v}" for k, v in keys.items()]


def lm_result(wd: Path) -> dict:
    from kslm_jax.core import config as config_lib
    cfg = config_lib.read_workdir_config(wd)
    model = json.loads((wd / "eval" / "lm.json").read_text())["model"]
    manifest = json.loads((wd / "data" / "tokens" / "manifest.json").read_text())
    seen = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return dict(bits_per_char=model["bits_per_char"], loss=model["loss"], steps=cfg.train.steps,
                train_tokens=manifest["train"]["tokens"], epochs=seen / manifest["train"]["tokens"])


def table(title: str, rows: dict, log: list, seconds: float, done: bool, shared: str) -> str:
    out = [f"{title}; {seconds:.0f}s {'in all' if done else 'so far'}", "",
           "| tokenizer | pieces | tokens/char | tokens/eojeol | tokens/byte | byte fallback | vocab used "
           "| train s | corpus tokens | LM epochs | held-out bits/char |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f, lm = r["report"], r.get("lm")
        lm_cells = (f"{lm['train_tokens'] / 1e6:.2f}M | {lm['epochs']:.2f} | {lm['bits_per_char']:.4f}"
                    if lm else "— | — | —")
        trained = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        out.append(f"| {name} ({f['model_type']}, pretokenize {f['pretokenize']}) | {f['pieces']:,} "
                   f"| {f['tokens_per_char']:.4f} | {f['tokens_per_word']:.3f} | {f['tokens_per_byte']:.4f} "
                   f"| {f['byte_fallback_rate']:.3%} | {f['vocab_used']:.1%} | {trained} | {lm_cells} |")
    out += ["", f"stages (LM={shared}):"]
    out += [f"- {e['seconds']:>6.1f}s  {e['command'].replace(shared, '$LM')}" for e in log]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fertility-only", action="store_true", help="train and measure tokenizers; no LMs")
    p.add_argument("--smoke", action="store_true", help="a review subset, small vocabularies and tiny LMs (CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--reuse", default=None, help="a --runs folder of an earlier run: take the tokenizers it has")
    p.add_argument("--steps", type=int, default=None, help="LM steps (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides for every LM, e.g. train.seed=1 (a repeat with another seed)")
    p.add_argument("--data", default=None, help="nsmc_reviews.jsonl.gz (default: .devdata/ or ../shared/data/ko/)")
    p.add_argument("--runs", default=str(REPO / "runs" / "tokenizers"), help="folder for the workdirs (replaced)")
    p.add_argument("--smoke-rows", type=int, default=20_000)
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    data = find_data("nsmc_reviews.jsonl.gz", args.data)
    reuse = Path(args.reuse).absolute() if args.reuse else None
    if reuse and Path(args.runs).absolute() == reuse:
        sys.exit("--reuse must name another folder than --runs (which is replaced)")
    runs = fresh(args.runs)
    if args.smoke:
        data = subset(data, runs / "nsmc_subset.jsonl.gz", args.smoke_rows)
    device = "this CPU" if args.fertility_only else device_name()
    title = (f"tokenizers{' --smoke' if args.smoke else ''} on {device}, reviews {data.name}, held out by movie_id"
             + ("" if args.fertility_only else f", LM {RECIPE}"))
    lm = [f"data.sources={data}"] + (SMOKE_LM if args.smoke else [])
    if args.steps:
        lm += [f"train.steps={args.steps}", f"checkpoint.every_steps={args.steps}"]
    lm += args.set
    log, rows, t0 = [], {}, time.perf_counter()

    def report(done=False) -> str:
        text = table(title, rows, log, time.perf_counter() - t0, done, " ".join(flags(lm)))
        write_out("tokenizers", text, {"title": title, "rows": rows, "stages": log})
        return text

    base = runs / "prepared"
    run(["prepare", "--config", RECIPE, "--workdir", str(base), *flags(lm)], log)
    for name in names:
        wd = runs / name
        keys = lm + tokenizer_keys(name, args.smoke)
        link_tree(base / "data" / "clean", wd / "data" / "clean")
        train_seconds = None
        if reuse and (reuse / name / "tokenizer" / "spm.model").is_file():
            (wd / "tokenizer").mkdir(parents=True)
            for f in ("spm.model", "spm.vocab"):
                shutil.copy2(reuse / name / "tokenizer" / f, wd / "tokenizer" / f)
            run(["tokenizer", "--report", "--config", RECIPE, "--workdir", str(wd), *flags(keys)], log)
        else:
            train_seconds = run(["tokenizer", "--config", RECIPE, "--workdir", str(wd), *flags(keys)], log)
        rows[name] = {"keys": keys[len(lm):], "train_seconds": train_seconds,
                      "report": json.loads((wd / "tokenizer" / "report.json").read_text())}
        report()
        if args.fertility_only:
            continue
        run(["tokenize", "--workdir", str(wd)], log)
        run(["train", "--workdir", str(wd)], log)
        rows[name]["lm"] = lm_result(wd)
        report()
    print("\n" + report(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
