"""What preference tuning changes: a small NSMC review model aligned toward positive reviews with DPO.

    python benchmarks/dpo_nsmc.py              # CPU (2 cores, shared: ~20 minutes), tiny shapes on 20k reviews
    python benchmarks/dpo_nsmc.py --betas 0.1,0.5 --ipo-betas 0.1 --steps 150 --samples 500 --reuse

Every training stage is the `kslm` command a user would type (printed before it runs):
1. the review model: prepare (held out by movie_id), tokenizer, tokenize and pretrain on a 20k-review subset of
   NSMC (configs/finetune_nsmc_base.py at tiny shapes);
2. the judge: the project's own sentiment classifier (finetune.kind=cls, rating >= 9 positive, <= 4 negative)
   fine-tuned from that model (configs/cls_tiny.py) on as many negative as positive reviews of the subset, so
   that its prior is even; its held-out accuracy is reported beside the table;
3. preference pairs from the same subset: chosen = a review rated >= 9, rejected = one rated <= 3, both after
   the shared prompt "영화 리뷰:"; DPO (and IPO) from the review model at each beta, same steps and learning rate;
4. in a child process: 500 reviews sampled (temperature 1) after the prompt from the reference and from each
   aligned model, classified by the judge: the positive fraction. The mean held-out reward margin and the
   held-out response perplexity against the reference's come from each run's eval/finetune.json.
One table, printed and written to $OUT/dpo_nsmc.md and .json when OUT is set.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, run, subset, timings, write_out

PROMPT = "영화 리뷰:"
TEMPLATE = "{prompt} {response}"
TINY = ["tokenizer.vocab_size=2000", "data.seq_len=128", "train.batch_size=16", "model.d_model=64",
        "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192", "model.dtype=float32",
        "model.attention=xla", "data.workers=0", "train.log_every=25", "logging.progress_bar=false",
        "optim.warmup_steps=10"]
FT = ["model.dtype=float32", "model.attention=xla", "data.seq_len=128", "train.batch_size=16", "data.workers=0",
      "train.log_every=25", "logging.progress_bar=false", "optim.warmup_steps=10"]


def make_pairs(reviews: Path, out: Path, max_chars: int, seed: int) -> dict:
    """Positive (>= 9) and negative (<= 3) reviews of at most max_chars characters, shuffled and zipped."""
    pos, neg = [], []
    with gzip.open(reviews, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            text = r["text"].strip()
            if 2 <= len(text) <= max_chars:
                (pos if r["rating"] >= 9 else neg if r["rating"] <= 3 else []).append(text)
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    with open(out, "w", encoding="utf-8") as f:
        for c, r in zip(pos, neg):
            f.write(json.dumps({"prompt": PROMPT, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n")
    return {"positive": len(pos), "negative": len(neg), "pairs": min(len(pos), len(neg))}


def balanced(reviews: Path, out: Path, seed: int) -> dict:
    """The judge's training file: as many positive (>= 9) as negative (<= 4) reviews, records kept whole (NSMC
    is mostly positive; a judge trained on its skew calls most unreadable text positive)."""
    pos, neg = [], []
    with gzip.open(reviews, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            (pos if r["rating"] >= 9 else neg if r["rating"] <= 4 else []).append(line)
    random.Random(seed).shuffle(pos)
    n = min(len(pos), len(neg))
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(pos[:n] + neg[:n])
    return {"per_class": n}


def score(judge: Path, models: dict, n: int, max_new: int, seed: int) -> dict:
    """In this (child) process: n samples from each model after the prompt, and the judge's verdicts."""
    import jax
    import numpy as np

    from kslm_jax.core import config as config_lib
    from kslm_jax.data import examples, finetune_data
    from kslm_jax.data import tokenizer as tok_lib
    from kslm_jax.eval import generate
    from kslm_jax.model import classify, llama
    from kslm_jax.objectives import finetune_io

    jcfg = config_lib.read_workdir_config(judge)
    sp = tok_lib.check_workdir(jcfg, judge)
    jmodel = llama.Transformer(llama.ModelConfig.from_config(jcfg))
    jparams, head = finetune_io.lm_params_host(jcfg, judge, with_head=True)
    text_tmpl = finetune_data.Template(jcfg.finetune.cls_template, sp, "judge")
    prompt_ids, _, _ = finetune_data.Template(TEMPLATE, sp, "prompt").encode({}, {"prompt": sp.EncodeAsIds(PROMPT),
                                                                                  "response": []})
    out = {}
    for name, wd in models.items():
        cfg = config_lib.read_workdir_config(wd)
        model = llama.Transformer(llama.ModelConfig.from_config(cfg))
        params = jax.device_put(finetune_io.restore_params_host(cfg, wd))
        rng = jax.random.PRNGKey(seed)
        texts, t0 = [], time.perf_counter()
        for i in range(n):
            ids = generate.generate_ids(model, params, prompt_ids, max_new_tokens=max_new, temperature=1.0, top_k=0,
                                        top_p=1.0, rng=jax.random.fold_in(rng, i), vocab_limit=sp.GetPieceSize())
            texts.append(sp.DecodeIds(ids).strip())
        seqs = [text_tmpl.encode({}, {"text": sp.EncodeAsIds(t)[: jcfg.data.seq_len - 2]})[0] for t in texts]
        ex = examples.ExampleSet(seqs, None, None, "cls")
        pos = []
        for batch, plan in examples.one_pass(ex, jcfg.train.batch_size, jcfg.data.seq_len,
                                             jcfg.data.max_segments_per_row):
            s = np.asarray(classify.predict(jmodel, jparams, head, None, batch))
            pos += [int(np.argmax(s[r, j]) == 1) for r, row in enumerate(plan) for j in range(len(row))]
        out[name] = {"positive_fraction": float(np.mean(pos)), "samples": n,
                     "mean_chars": float(np.mean([len(t) for t in texts])), "seconds": time.perf_counter() - t0,
                     "examples": texts[:5]}
        print(f"{name}: positive {out[name]['positive_fraction']:.3f} of {n} samples", flush=True)
    return out


def table(title: str, rows: dict, judge: dict, pairs: dict, log: list, seconds: float) -> str:
    out = [f"{title}; {seconds:.0f}s in all", "",
           f"judge (finetune.kind=cls on {judge['per_class']:,} reviews a class, held-out movies): accuracy "
           f"{judge['accuracy']:.4f}, macro-F1 {judge['macro_f1']:.4f} on {judge['examples']:,} reviews; pairs: "
           f"{pairs['pairs']:,} ({pairs['positive']:,} positive, {pairs['negative']:,} negative reviews)", "",
           "| model | beta | positive fraction of samples | mean sample chars | held-out reward margin "
           "| held-out pair accuracy | held-out ppl (reference ppl) | ppl drift | steps |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ev = r.get("eval")
        if ev is None:
            out.append(f"| {name} | - | {r['positive_fraction']:.3f} | {r['mean_chars']:.1f} | 0 | - | - | 1 | 0 |")
            continue
        out.append(f"| {name} | {r['beta']} | {r['positive_fraction']:.3f} | {r['mean_chars']:.1f} "
                   f"| {ev['reward_margin']:.3f} "
                   f"| {ev['accuracy']:.3f} | {ev['perplexity']:.2f} ({ev['reference_perplexity']:.2f}) "
                   f"| {ev['perplexity_drift']:.3f} | {r['steps']} |")
    out += timings(log)
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="nsmc_reviews.jsonl.gz (default: .devdata/ or ../shared/data/ko/)")
    p.add_argument("--runs", default=str(REPO / "runs" / "dpo_nsmc"), help="folder for the workdirs (replaced)")
    p.add_argument("--rows", type=int, default=20_000, help="reviews of the subset")
    p.add_argument("--betas", default="0.1,0.5")
    p.add_argument("--ipo-betas", default="0.1", help="IPO runs beside the DPO ones ('' = none)")
    p.add_argument("--steps", type=int, default=150, help="DPO steps per beta")
    p.add_argument("--lr", type=float, default=3e-4, help="DPO learning rate")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--judge-steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--max-new", type=int, default=40)
    p.add_argument("--reuse", action="store_true", help="keep --runs and skip the stages whose results are there")
    p.add_argument("--score", default=None, help=argparse.SUPPRESS)  # child process: JSON arguments
    args = p.parse_args()
    if args.score:
        a = json.loads(args.score)
        print("SCORES " + json.dumps(score(Path(a["judge"]), {k: Path(v) for k, v in a["models"].items()},
                                           a["n"], a["max_new"], a["seed"])))
        return 0

    runs = Path(args.runs).absolute() if args.reuse else fresh(args.runs)
    data = runs / "nsmc_subset.jsonl.gz"
    if not data.is_file():
        subset(find_data("nsmc_reviews.jsonl.gz", args.data), data, args.rows)
    title = f"dpo_nsmc on {device_name()}, {args.rows:,} reviews, prompt {PROMPT!r}"
    log, rows, t0 = [], {}, time.perf_counter()
    base, judge = runs / "base", runs / "judge"
    base_cfg = [f"data.sources={data}", f"train.steps={args.base_steps}",
                f"checkpoint.every_steps={args.base_steps}"] + TINY

    def stage(cmd, result: Path):
        if not (args.reuse and result.is_file()):
            Path(cmd[cmd.index("--workdir") + 1]).mkdir(parents=True, exist_ok=True)  # `kslm train` makes none
            run(cmd, log)
    for name in ("prepare", "tokenizer", "tokenize"):
        stage([name, "--config", "configs/finetune_nsmc_base.py", "--workdir", str(base), *flags(base_cfg)],
              base / "data" / "tokens" / "manifest.json")
    stage(["train", "--workdir", str(base)], base / "eval" / "lm.json")
    ft = [f"finetune.init_from={base}"] + FT
    judge_file = runs / "judge_balanced.jsonl"
    judge_data = balanced(data, judge_file, 0)
    stage(["train", "--config", "configs/cls_tiny.py", "--workdir", str(judge),
           *flags(ft + [f"finetune.train_files={judge_file}", f"train.steps={args.judge_steps}",
                        f"checkpoint.every_steps={args.judge_steps}", "finetune.eval_examples=2000"])],
          judge / "eval" / "finetune.json")
    judged = dict(json.loads((judge / "eval" / "finetune.json").read_text())["eval"], **judge_data)
    pairs_file = runs / "pairs.jsonl"
    pairs = make_pairs(data, pairs_file, 60, 0)
    models = {"reference (the review model)": base}
    runs_spec = ([("dpo", b) for b in args.betas.split(",") if b]
                 + [("ipo", b) for b in args.ipo_betas.split(",") if b])
    for kind, beta in runs_spec:
        wd = runs / f"{kind}_beta{beta}"
        stage(["train", "--workdir", str(wd), *flags(ft + [
            "finetune.kind=dpo", f"finetune.train_files={pairs_file}", f"finetune.template={TEMPLATE}",
            "finetune.val_fraction=0.1", "finetune.eval_examples=1000", f"finetune.dpo_loss={kind}",
            f"finetune.dpo_beta={beta}", f"optim.lr={args.lr}", f"train.steps={args.steps}",
            f"checkpoint.every_steps={args.steps}"])], wd / "eval" / "finetune.json")
        r = json.loads((wd / "eval" / "finetune.json").read_text())
        name = f"{kind.upper()} beta={beta}"
        models[name] = wd
        rows[name] = {"beta": float(beta), "eval": r["eval"], "steps": r["step"]}
    t = time.perf_counter()
    child = json.dumps({"judge": str(judge), "models": {k: str(v) for k, v in models.items()},
                        "n": args.samples, "max_new": args.max_new, "seed": 0})
    done = subprocess.run([sys.executable, __file__, "--score", child], cwd=REPO, check=True, capture_output=True,
                          text=True)
    scores = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("SCORES "))[7:])
    log.append({"command": f"(sample {args.samples} per model and classify)",
                "seconds": round(time.perf_counter() - t, 1)})
    rows = {name: dict(rows.get(name, {}), **scores[name]) for name in models}
    text = table(title, rows, judged, pairs, log, time.perf_counter() - t0)
    write_out("dpo_nsmc", text, {"title": title, "rows": rows, "judge": judged, "pairs": pairs, "stages": log})
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
