"""Which tokenizer for Korean? BPE, unigram, Kiwi-morpheme BPE and jamo BPE at 16k and 32k pieces, on NSMC reviews.

    python benchmarks/tokenizers.py --fertility-only   # any machine: train the tokenizers, fertility table
    python benchmarks/tokenizers.py                    # one GPU: + a small LM per tokenizer, held-out bits/char
    python benchmarks/tokenizers.py --reuse runs/tokenizers --variants bpe16k,kiwi16k   # LMs on tokenizers
                                                       # trained earlier (e.g. on a CPU box), no retraining
    python benchmarks/tokenizers.py --smoke            # CPU: 20k reviews, 2k/4k pieces, tiny LMs
    python benchmarks/tokenizers.py --fertility-only --variants jamo16k,jamo32k,bpe16k   # a few, CPU

Every stage is the `kslm` command a user would type (printed before it runs):
1. prepare the reviews once (held out by movie_id: no movie on both sides); every variant's workdir gets
   the same clean shards (hard links);
2. per variant, `kslm tokenizer` (or the --reuse'd model) and `kslm tokenizer --report`: tokens per character,
   per eojeol and per byte on the held-out reviews, byte-fallback rate, vocabulary used;
3. unless --fertility-only, `kslm tokenize` and `kslm train --config configs/tokenizer_nsmc.py`: the same model
   shape, steps and batch for every variant (so the same number of *tokens*, which is the same compute but
   not the same text: a tokenizer with fewer tokens per character sees more of the corpus), then the
   held-out loss in bits per character from eval/lm.json, which every tokenizer can be compared on;
4. robustness to noise (--noise, default 0.05; 0: off): the held-out reviews again with a typo in that share
   of their Hangul syllables (one jamo swapped for another of its kind, dropped, or typed twice:
   kslm_jax.data.jamo.inject_typos, seeded), measured for tokens per character and, with LMs, for bits per
   character through `kslm eval --tasks ppl=clean,ppl=noisy` (both files the same reviews, so the two numbers
   share one accounting; the clean one matches eval/lm.json up to its windowing). --eval-limit N scores only
   the first N held-out reviews (clean and noisy alike), for a CPU budget.
One table, printed and written to $OUT/tokenizers.md and .json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, link_tree, run, subset, write_out

from kslm_jax.data import jamo
from kslm_jax.data import prepare as prepare_lib
from kslm_jax.data import tokenizer as tok_lib

RECIPE = "configs/tokenizer_nsmc.py"
VARIANTS = {  # name: tokenizer keys
    "bpe16k": dict(vocab_size=16000, model_type="bpe", pretokenize="none"),
    "unigram16k": dict(vocab_size=16000, model_type="unigram", pretokenize="none"),
    "kiwi16k": dict(vocab_size=16000, model_type="bpe", pretokenize="kiwi"),
    "jamo16k": dict(vocab_size=16000, model_type="bpe", pretokenize="jamo"),
    "bpe32k": dict(vocab_size=32000, model_type="bpe", pretokenize="none"),
    "unigram32k": dict(vocab_size=32000, model_type="unigram", pretokenize="none"),
    "kiwi32k": dict(vocab_size=32000, model_type="bpe", pretokenize="kiwi"),
    "jamo32k": dict(vocab_size=32000, model_type="bpe", pretokenize="jamo"),
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


def held_out(base: Path, runs: Path, rate: float, seed: int = 0) -> tuple[Path, Path]:
    """The held-out reviews as a ppl task file, and the same reviews with typos in `rate` of their syllables."""
    texts = list(prepare_lib.read_clean(base / "data" / "clean", "val"))
    rng = random.Random(seed)
    paths = runs / "held_out.jsonl", runs / f"held_out_typos{rate:g}.jsonl"
    for path, docs in zip(paths, (texts, (jamo.inject_typos(t, rate, rng) for t in texts))):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs)
    return paths


def noisy_fertility(wd: Path, noisy: Path) -> dict:
    sp = tok_lib.load(wd / "tokenizer" / "spm.model")
    with open(noisy, encoding="utf-8") as f:
        return tok_lib.fertility(sp, (json.loads(line)["text"] for line in f))


def noise_result(wd: Path) -> dict:
    ppl = [json.loads((wd / "eval" / f"{n}.json").read_text()) for n in ("ppl", "ppl_2")]
    return dict(clean_bits_per_char=ppl[0]["bits_per_char"], noisy_bits_per_char=ppl[1]["bits_per_char"])


def table(title: str, rows: dict, log: list, seconds: float, done: bool, shared: str, noise: float) -> str:
    typos = f" | tokens/char (byte fallback), {noise:.0%} typos | bits/char clean → {noise:.0%} typos" if noise else ""
    out = [f"{title}; {seconds:.0f}s {'in all' if done else 'so far'}", "",
           "| tokenizer | pieces | tokens/char | tokens/eojeol | tokens/byte | byte fallback | vocab used "
           f"| train s | corpus tokens | LM epochs | held-out bits/char{typos} |",
           "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if noise else "")]
    for name, r in rows.items():
        f, lm = r["report"], r.get("lm")
        lm_cells = (f"{lm['train_tokens'] / 1e6:.2f}M | {lm['epochs']:.2f} | {lm['bits_per_char']:.4f}"
                    if lm else "— | — | —")
        if noise:
            nb = r.get("noise_lm")
            lm_cells += (f" | {r['noisy']['tokens_per_char']:.4f} ({r['noisy']['byte_fallback_rate']:.3%}) | "
                         + (f"{nb['clean_bits_per_char']:.4f} → {nb['noisy_bits_per_char']:.4f}" if nb else "—"))
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
    p.add_argument("--eval-limit", type=int, default=0,
                   help="held-out reviews (the first N) for the clean/noisy bits/char (0: all; a CPU budget)")
    p.add_argument("--noise", type=float, default=0.05,
                   help="share of held-out syllables given a jamo typo for the robustness columns (0: skip them)")
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
        text = table(title, rows, log, time.perf_counter() - t0, done, " ".join(flags(lm)), args.noise)
        write_out("tokenizers", text, {"title": title, "rows": rows, "stages": log})
        return text

    base = runs / "prepared"
    run(["prepare", "--config", RECIPE, "--workdir", str(base), *flags(lm)], log)
    clean_file, noisy_file = held_out(base, runs, args.noise) if args.noise else (None, None)
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
        if noisy_file:
            rows[name]["noisy"] = noisy_fertility(wd, noisy_file)
        report()
        if args.fertility_only:
            continue
        run(["tokenize", "--workdir", str(wd)], log)
        run(["train", "--workdir", str(wd)], log)
        rows[name]["lm"] = lm_result(wd)
        if noisy_file:
            run(["eval", "--workdir", str(wd), "--limit", str(args.eval_limit), "--tasks", f"ppl={clean_file},ppl={noisy_file}"], log)
            rows[name]["noise_lm"] = noise_result(wd)
        report()
    print("\n" + report(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
