"""GRU (or LSTM) against the decoder at equal parameters: held-out bits/char, training and generation tokens/s,
and bits/char by position in the document (context length), on the demo corpus and on NSMC.

    python benchmarks/recurrent_vs_decoder.py --corpus demo
    python benchmarks/recurrent_vs_decoder.py --corpus nsmc_movies --steps 300

Corpora:
  demo         configs/tiny_ko.py as the README runs it (paragraphs, seq_len 128) against configs/gru_tiny_ko.py.
  nsmc_movies  NSMC reviews of one movie joined into one document (date order, one review a line, at most
               --doc-chars characters), the first --movies movies of the file, held out by movie_id; seq_len
               1024, so positions 257-1024 exist. Single reviews are too short to show any context effect.
Each run trains from scratch in its own workdir under --out; a corpus is prepared once and shared.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from kslm_jax.cli import commands
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.data import pipeline
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import generate
from kslm_jax.eval import lm as lm_eval
from kslm_jax.model import llama
from kslm_jax.objectives import lm
from kslm_jax.train import step as step_lib

BUCKETS = ((1, 64), (65, 256), (257, 1024))
LN2 = float(np.log(2.0))


def nsmc_movies(src: Path, out: Path, movies: int, doc_chars: int) -> Path:
    by_movie: dict[str, list[tuple[str, str]]] = {}
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["movie_id"] not in by_movie and len(by_movie) == movies:
                continue
            by_movie.setdefault(r["movie_id"], []).append((r.get("date", ""), r["text"].strip()))
    with out.open("w", encoding="utf-8") as f:
        for mid, reviews in by_movie.items():
            text = ""
            for _, t in sorted(reviews):
                if t and len(text) + len(t) + 1 <= doc_chars:
                    text += t + "\n"
            f.write(json.dumps({"movie_id": mid, "text": text.strip()}, ensure_ascii=False) + "\n")
    return out


def corpus_overrides(args) -> list[str]:
    if args.corpus == "demo":
        return []
    src = nsmc_movies(Path(args.nsmc), Path(args.out) / "nsmc_movies.jsonl", args.movies, args.doc_chars)
    # The filters that judge single documents (repeated lines and n-grams) would drop whole movies; keep them.
    return [f"data.sources={src}", "data.text_field=text", "data.split_field=movie_id", "data.val_fraction=0.1",
            "data.min_chars=2", "data.max_top_2gram_ratio=1.0", "data.max_top_3gram_ratio=1.0",
            "data.max_top_4gram_ratio=1.0", "data.max_dup_line_ratio=1.0", "data.dedup.near=false",
            "data.seq_len=1024", "tokenizer.vocab_size=4000",
            f"model.d_model={args.d_model}", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.tie_embeddings=true", "optim.lr=3e-3", "optim.warmup_steps=20", "optim.weight_decay=0.1",
            f"train.batch_size={args.batch}"]


ARCH = {"decoder": [], "gru": ["model.arch=gru", "model.n_layers=8"], "lstm": ["model.arch=lstm", "model.n_layers=6"]}


def chars_per_piece(sp) -> tuple[np.ndarray, np.ndarray]:
    """Characters each piece stands for, as eval/lm.py counts them (EOS is one, the separator; BOS none; a byte
    piece one when it starts a UTF-8 character), and whether the piece opens with the word-boundary mark."""
    out, lead = np.zeros(sp.GetPieceSize(), np.float64), np.zeros(sp.GetPieceSize(), bool)
    for i in range(sp.GetPieceSize()):
        if sp.IsByte(i):
            b = int(sp.IdToPiece(i)[1:-1], 16)
            out[i] = 1.0 if b < 0x80 or b >= 0xC0 else 0.0
        elif i == tok_lib.EOS:
            out[i] = 1.0
        elif not sp.IsControl(i):
            out[i] = len(sp.IdToPiece(i).replace("\u2581", " "))
            lead[i] = sp.IdToPiece(i).startswith("\u2581")
    return out, lead


def by_position(trainer, sp, manifest_val: dict) -> dict:
    """Bits per character of the held-out split in buckets of the predicted token's place in its document.

    Characters per token come from the pieces; the space SentencePiece puts before a document's first piece
    is not text and is not counted. The counted total is then scaled to the manifest's (the number eval/lm.py
    divides by), so the buckets average to the held-out bits/char; `chars_counted_over_manifest` says how
    far apart the two counts were."""
    cfg = trainer.cfg
    chars, lead = chars_per_piece(sp)
    fwd = jax.jit(lambda p, b: step_lib.token_losses(trainer.model.apply({"params": p}, b["inputs"], b["positions"],
                                                                         b["segment_ids"]), b["targets"],
                                                     b["segment_ids"] > 0)[0])
    bits, nchars, ntok = (np.zeros(len(BUCKETS)) for _ in range(3))
    for b in pipeline.eval_batches(trainer.paths["tokens"], cfg.data, cfg.train.batch_size):
        ce = np.asarray(fwd(trainer.state.params, b))
        real = b["segment_ids"] > 0
        ctx = b["positions"] + 1  # the target at input position p is the (p+1)-th token after BOS
        tgt = np.clip(b["targets"], 0, len(chars) - 1)
        c = chars[tgt] - ((ctx == 1) & lead[tgt])
        for k, (lo, hi) in enumerate(BUCKETS):
            m = real & (ctx >= lo) & (ctx <= hi)
            bits[k] += ce[m].sum() / LN2
            nchars[k] += c[m].sum()
            ntok[k] += m.sum()
    ratio = nchars.sum() / (manifest_val["chars"] + manifest_val["docs"])
    out = {f"{lo}-{hi}": {"bits_per_char": float(s / (c / ratio)) if c else None, "tokens": int(n)}
           for (lo, hi), s, c, n in zip(BUCKETS, bits, nchars, ntok)}
    return dict(out, chars_counted_over_manifest=float(ratio))


def generation_speed(trainer, sp, new: int) -> float:
    ids = [tok_lib.BOS] + sp.EncodeAsIds("영화가 정말")
    kw = dict(max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0, vocab_limit=sp.GetPieceSize(), stop_id=None)
    generate.generate_ids(trainer.model, trainer.state.params, ids, rng=jax.random.PRNGKey(0), **kw)  # compiles
    t0 = time.perf_counter()
    out = generate.generate_ids(trainer.model, trainer.state.params, ids, rng=jax.random.PRNGKey(0), **kw)
    return len(out) / (time.perf_counter() - t0)


def run(args, base: Path, overrides: list[str], arch: str) -> dict:
    wd = Path(args.out) / f"{args.corpus}-{arch}"
    if wd.exists():
        shutil.rmtree(wd)
    shutil.copytree(base, wd, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "metrics.jsonl", "eval"))
    extra = [f"train.steps={args.steps}", "train.log_every=10", "train.eval_every=0", "logging.progress_bar=false",
             f"checkpoint.every_steps={args.steps}", "mesh.data=1"]
    recipe = args.recipe.get(arch)  # a recipe sets its own shape; otherwise ARCH's keys give the equal-size model
    shape = [] if recipe else ARCH[arch]
    cfg = workdir_lib.config_for(wd, recipe, overrides + shape + extra, force=True)
    trainer = lm.trainer(cfg, wd)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r][1:]  # the first holds the compile
    sp = tok_lib.check_workdir(cfg, wd)
    held = trainer.evaluate()
    return {"corpus": args.corpus, "arch": arch, "params": int(llama.param_count(trainer.state.params)),
            "steps": args.steps, "seq_len": cfg.data.seq_len, "batch": cfg.train.batch_size,
            "train_tokens_per_sec": statistics.median(rates), "train_wall_s": wall,
            "bits_per_char": held["bits_per_char"],
            "by_position": by_position(trainer, sp, trainer.objective.manifest["val"]),
            "generate_tokens_per_sec": generation_speed(trainer, sp, args.new_tokens), "device": str(jax.devices()[0]),
            "unigram_bits_per_char": lm_eval.unigram_baseline(trainer.paths["tokens"],
                                                              cfg.tokenizer.vocab_size)["bits_per_char"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["demo", "nsmc_movies"], default="demo")
    p.add_argument("--archs", default="decoder,gru")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--movies", type=int, default=600)
    p.add_argument("--doc-chars", type=int, default=4000)
    p.add_argument("--d-model", type=int, default=64, help="nsmc_movies: width of both models")
    p.add_argument("--batch", type=int, default=4, help="nsmc_movies: rows of 1024 tokens per step")
    p.add_argument("--nsmc", default="../shared/data/ko/nsmc_reviews.jsonl.gz")
    p.add_argument("--out", default="runs/recurrent_bench")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.recipe = {"decoder": "tiny_ko", "gru": "gru_tiny_ko"} if args.corpus == "demo" else {}
    overrides = corpus_overrides(args)
    base = Path(args.out) / f"{args.corpus}-prepared"
    if not (workdir_lib.paths(base)["tokens"] / "manifest.json").is_file():
        ns = SimpleNamespace(workdir=str(base), config=args.recipe.get("decoder"), force=True)
        for stage in (commands.prepare, commands.tokenizer, commands.tokenize):
            stage(ns, overrides)
    with open(Path(args.out) / "results.jsonl", "a", encoding="utf-8") as f:
        for arch in args.archs.split(","):
            r = run(args, base, overrides, arch)
            print(json.dumps(r, ensure_ascii=False), flush=True)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
