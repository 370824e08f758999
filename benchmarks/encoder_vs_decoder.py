"""The masked-LM encoder against the decoder at equal parameters and equal pretraining tokens, on 2 CPU cores.

    nice -n 10 python benchmarks/encoder_vs_decoder.py --runs /tmp/encdec     (~30 minutes on 2 cores)

Every stage is the `kslm` command a user would type (printed before it runs), in a child process:
1. one prepared corpus: the first --reviews NSMC reviews, held out by movie_id, one tokenizer for both models
   (with the <|mask|> piece, which the decoder never reads); then two copies pretrained with the same shape,
   steps, batch and rows (so the same parameters and the same tokens read): model.arch=decoder (next-token
   loss on every token) and model.arch=encoder (masked LM: configs/encoder_tiny_ko.py's mlm keys);
2. sentiment (configs/cls_tiny.py: rating ≥ 9 positive, ≤ 4 negative, held out by movie_id) from each base,
   same steps; finetune.pool=auto (the decoder's last token, the encoder's first, its BOS); accuracy and
   macro-F1 on the held-out movies (the run's eval/finetune.json);
3. KorNLI: only the dev file is shared (no train set), so it is split by premise (sentence1's hash, so no
   premise is on both sides) into a fine-tuning half and a scored half; a cls head is fine-tuned from each
   base on the first and `kslm eval --tasks cls=` scores the second. The decoder's zero-shot multiple-choice
   score (`--tasks kornli=`, next-token likelihood) of the same half is reported beside it; an encoder has none;
4. KorSTS dev through `kslm eval --tasks korsts=`: cosine of the mean final states, no training on KorSTS,
   for both bases.
The table goes to stdout and, when OUT is set, $OUT/encoder_vs_decoder.md and .json.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, run, subset, timings, write_out

SHAPE = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.tie_embeddings=true", "tokenizer.vocab_size=4000", "tokenizer.special_tokens=<|mask|>",
         "data.seq_len=128", "train.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=30",
         "logging.progress_bar=false", "train.log_every=50", "mesh.data=1"]
NLI_LABELS = "entailment,neutral,contradiction"


def kornli_halves(src: Path, out: Path) -> tuple[Path, Path]:
    """The dev file as two jsonl halves split by premise; `text` joins the pair for a cls head."""
    halves = ([], [])
    with src.open(encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            r = {k: (v or "").strip() for k, v in r.items()}
            if not (r["sentence1"] and r["sentence2"] and r["gold_label"]):
                continue
            r["text"] = f"{r['sentence1']}\n{r['sentence2']}"
            halves[zlib.crc32(r["sentence1"].encode("utf-8")) % 2].append(r)
    paths = []
    for name, rows in zip(("kornli_train_half.jsonl", "kornli_test_half.jsonl"), halves):
        p = out / name
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


def task_json(wd: Path, name: str) -> dict:
    return json.loads((wd / "eval" / f"{name}.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(REPO / "runs" / "encoder_vs_decoder"), help="workdirs (replaced)")
    p.add_argument("--reviews", type=int, default=30_000, help="NSMC reviews of the pretraining corpus")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of each base")
    p.add_argument("--cls-steps", type=int, default=200, help="fine-tuning steps of each classifier")
    p.add_argument("--resume", action="store_true", help="keep --runs and skip the stages whose results exist")
    args = p.parse_args()
    runs = Path(args.runs).absolute() if args.resume else fresh(args.runs)
    nsmc = subset(find_data("nsmc_reviews.jsonl.gz"), runs / "nsmc.jsonl.gz", args.reviews)
    nli_train, nli_test = kornli_halves(find_data("kornli_xnli_dev.tsv"), runs)
    sts = find_data("korsts_dev.tsv")
    title = (f"encoder_vs_decoder on {device_name()}: {args.reviews:,} NSMC reviews, {args.steps} pretraining "
             f"steps, {args.cls_steps} fine-tuning steps")
    log, rows, t0 = [], {}, time.perf_counter()
    prepared = runs / "prepared"
    corpus = [f"data.sources={nsmc}", "data.split_field=movie_id", "data.val_fraction=0.05"] + SHAPE
    if not (prepared / "tokens" / "manifest.json").is_file():
        for stage in ("prepare", "tokenizer", "tokenize"):
            run([stage, "--workdir", str(prepared), *flags(corpus)], log)
    pre = [f"train.steps={args.steps}", f"checkpoint.every_steps={args.steps}"]
    ft = [f"train.steps={args.cls_steps}", f"checkpoint.every_steps={args.cls_steps}", "train.eval_every=0",
          "logging.progress_bar=false", "train.log_every=50"]
    for arch in ("decoder", "encoder"):
        base = runs / f"{arch}_base"
        done = lambda wd, name: (wd / "eval" / f"{name}.json").is_file()  # noqa: E731
        if not done(base, "mlm" if arch == "encoder" else "lm"):
            shutil.rmtree(base, ignore_errors=True)
            shutil.copytree(prepared, base)  # the same shards and tokenizer; model.arch is free before a checkpoint
            run(["train", "--workdir", str(base), *flags([f"model.arch={arch}", "mlm.whole_eojeol=true"] + pre)], log)
        r = {"pretrain": task_json(base, "mlm" if arch == "encoder" else "lm")}
        sent, nli = runs / f"{arch}_nsmc", runs / f"{arch}_kornli"
        if not done(sent, "finetune"):
            shutil.rmtree(sent, ignore_errors=True)
            sent.mkdir()  # a fine-tuning workdir starts empty; its base is finetune.init_from
            run(["train", "--config", "configs/cls_tiny.py", "--workdir", str(sent), *flags(
                ft + [f"finetune.init_from={base}", f"finetune.train_files={nsmc}", "finetune.eval_examples=0"])], log)
        e = json.loads((sent / "eval" / "finetune.json").read_text())
        r["nsmc"], r["params"] = e["eval"], e["params"]
        if not done(nli, "cls"):
            shutil.rmtree(nli, ignore_errors=True)
            nli.mkdir()
            run(["train", "--config", "configs/cls_tiny.py", "--workdir", str(nli), *flags(
                ft + [f"finetune.init_from={base}", f"finetune.train_files={nli_train}", "finetune.text_field=text",
                      "finetune.label_field=gold_label", f"finetune.labels={NLI_LABELS}", "finetune.label_bins=",
                      "finetune.split_field=sentence1", "finetune.eval_examples=0", "data.seq_len=128"])], log)
            run(["eval", "--workdir", str(nli), "--tasks", f"cls={nli_test}"], log)
        r["kornli_cls"] = task_json(nli, "cls")
        tasks = f"korsts={sts}" + (f",kornli={nli_test}" if arch == "decoder" else "")
        if not done(base, "korsts"):
            run(["eval", "--workdir", str(base), "--tasks", tasks], log)
        r["korsts"] = task_json(base, "korsts")
        if arch == "decoder":
            r["kornli_zero_shot"] = task_json(base, "kornli")
        rows[arch] = r
        write_out("encoder_vs_decoder", json.dumps(rows, indent=2), {"title": title, "rows": rows, "stages": log})
    text = table(title, rows, log, time.perf_counter() - t0)
    print("\n" + text)
    write_out("encoder_vs_decoder", text, {"title": title, "rows": rows, "stages": log})
    return 0


def table(title: str, rows: dict, log: list, seconds: float) -> str:
    out = [f"{title}; {seconds:.0f}s in all", "",
           "| base | params | pretraining held-out | NSMC acc | NSMC macro-F1 | KorNLI cls acc | KorNLI cls "
           "macro-F1 | KorNLI zero-shot acc | KorSTS spearman |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in rows.items():
        pt = r["pretrain"]
        held = (f"MLM loss {pt['loss']:.3f}, acc {pt['accuracy']:.3f}" if arch == "encoder" else
                f"LM loss {pt['model']['loss']:.3f}, {pt['model']['bits_per_char']:.3f} bits/char")
        zs = r.get("kornli_zero_shot")
        out.append(f"| {arch} | {r['params']['total']:,} | {held} | {r['nsmc']['accuracy']:.4f} "
                   f"| {r['nsmc']['macro_f1']:.4f} | {r['kornli_cls']['accuracy']:.4f} "
                   f"| {r['kornli_cls']['macro_f1']:.4f} | {'n/a' if zs is None else format(zs['accuracy'], '.4f')} "
                   f"| {r['korsts']['spearman']:.4f} |")
    out += timings(log)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
