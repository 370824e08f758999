"""Held-out quality, file size and CPU speed of every deployable form of one trained workdir.

    python benchmarks/export_quality.py --workdir runs/nsmc [--docs 500] [--threads 2]
        [--speed-recipe configs/ko_125m.py]

Rows: JAX float32, JAX bfloat16 (weights rounded to bf16, bf16 matrix products), JAX weight-only int8 /
int4 (dequantized, see export/quantize.py), and llama.cpp (llama-cpp-python) on the GGUF exports F16,
Q8_0 and Q4_0. Every row scores the same held-out documents: the first --docs validation documents that
fit one window of data.seq_len tokens, each as [BOS] text [EOS] with every token after BOS predicted once.
Perplexity is per token; bits per character count EOS as one character, as `kslm eval` does. For
llama.cpp the log-probabilities are computed here from its logits (logits_all). Speed: prompt processing
of --prompt tokens in one batch and generation of --gen tokens one at a time (greedy), n_threads=--threads,
best of --repeats, as llama.cpp's own timers report them (they exclude Python). Nothing here trains or
downloads anything.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LN2 = math.log(2.0)


def held_out(workdir: Path, sp, window: int, n_docs: int):
    """Token lists [BOS] ids [EOS] and their character counts (text + 1 for EOS)."""
    from kslm_jax.core import workdir as workdir_lib
    from kslm_jax.data import prepare as prepare_lib
    docs, chars, skipped = [], 0, 0
    for text in prepare_lib.read_clean(workdir_lib.paths(workdir)["clean"], "val"):
        ids = [sp.bos_id(), *sp.EncodeAsIds(text), sp.eos_id()]
        if len(ids) > window:
            skipped += 1
            continue
        docs.append(ids)
        chars += len(text) + 1
        if len(docs) == n_docs:
            break
    return docs, chars, skipped


def jax_nll(c, params, docs, window: int) -> float:
    import jax
    import jax.numpy as jnp

    from kslm_jax.model import llama
    model = llama.Transformer(c)
    batch = max(1, min(32, 2**26 // (window * c.vocab_size)))  # float32 logits of a batch within 256 MiB

    @jax.jit
    def nll_sum(p, tokens, mask):
        logp = jax.nn.log_softmax(model.apply({"params": p}, tokens[:, :-1]).astype(jnp.float32), -1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return -(picked * mask[:, 1:]).sum()

    total = 0.0
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        tokens = np.zeros((batch, window), np.int32)  # a fixed shape: one compilation for every batch
        mask = np.zeros((batch, window), np.float32)
        for i, ids in enumerate(chunk):
            tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1.0
        total += float(nll_sum(params, tokens, mask))
    return total


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def llama_nll(path: Path, docs, window: int, threads: int) -> float:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, n_threads=threads,
                          logits_all=True, verbose=False)
    total = 0.0
    for ids in docs:
        llm.reset()
        llm.eval(ids[:-1])
        logp = _log_softmax(np.asarray(llm.scores[:len(ids) - 1]))
        total -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
    return total


def llama_speed(path: Path, prompt: list[int], gen: int, threads: int, repeats: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) from llama.cpp's own timers, best of `repeats`."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + gen + 8, n_batch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    ctx = llm._ctx.ctx
    pp = tg = 0.0
    for _ in range(repeats):
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        llm.eval(prompt)
        for _ in range(gen):
            # without logits_all the wrapper keeps no scores; the context holds the last row
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(last))])
        perf = llama_cpp.llama_perf_context(ctx)
        pp = max(pp, perf.n_p_eval / (perf.t_p_eval_ms / 1e3))
        tg = max(tg, perf.n_eval / (perf.t_eval_ms / 1e3))
    return pp, tg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, type=Path, help="a trained run (config.json, checkpoints, data)")
    ap.add_argument("--docs", type=int, default=500, help="held-out documents scored by every row")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prompt-processing speed")
    ap.add_argument("--gen", type=int, default=64, help="tokens generated for the generation speed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="keep the GGUF files here (default: a temp folder)")
    ap.add_argument("--speed-recipe", action="append", default=[],
                    help="also time llama.cpp on random weights of this recipe's shape, e.g. configs/ko_125m.py "
                         "(speed does not depend on the weights' values; repeatable)")
    args = ap.parse_args(argv)

    import dataclasses

    import jax
    import jax.numpy as jnp

    from kslm_jax.core import config as config_lib
    from kslm_jax.data import tokenizer as tok_lib
    from kslm_jax.export import gguf_io
    from kslm_jax.model import llama, quantize
    from kslm_jax.objectives import finetune_io

    cfg = config_lib.read_workdir_config(args.workdir)
    sp = tok_lib.check_workdir(cfg, args.workdir)
    params = finetune_io.restore_params_host(cfg, args.workdir)
    c = dataclasses.replace(llama.ModelConfig.from_config(cfg), dtype="float32", param_dtype="float32")
    window = cfg.data.seq_len
    docs, chars, skipped = held_out(args.workdir, sp, window, args.docs)
    tokens = sum(len(d) - 1 for d in docs)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"workdir {args.workdir}: {n_params / 1e6:.2f}M parameters, vocab {c.vocab_size}, d_model {c.d_model}, "
          f"{c.n_layers} layers; held-out: {len(docs)} documents, {tokens} predicted tokens, {chars} characters "
          f"({skipped} longer than {window} tokens skipped); CPU threads {args.threads}", flush=True)

    rows = []
    def add(name, nll, size, pp=None, tg=None):
        rows.append((name, nll, size, pp, tg))
        print(f"  {name}: {nll / tokens:.4f} nats/token", flush=True)

    t0 = time.perf_counter()
    add("JAX float32", jax_nll(c, params, docs, window), n_params * 4)
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)  # weights stored and used in bf16
    add("JAX bfloat16", jax_nll(dataclasses.replace(c, dtype="bfloat16", param_dtype="bfloat16"), bf16, docs, window),
        n_params * 2)
    for mode in quantize.MODES:
        q, size = quantize.quantize_params(params, c, mode)
        add(f"JAX {mode} weight-only", jax_nll(c, q, docs, window), size["bytes"])

    stream = [i for d in docs for i in d]
    prompt = (stream * (args.prompt // max(len(stream), 1) + 1))[:args.prompt]
    folder = args.out or Path(tempfile.mkdtemp(prefix="export_quality-"))
    for quant in gguf_io.QUANTS:
        path = gguf_io.write_gguf(params, cfg, sp, folder / f"model-{quant}.gguf", quant)
        nll = llama_nll(path, docs, window, args.threads)
        pp, tg = llama_speed(path, prompt, args.gen, args.threads, args.repeats)
        add(f"llama.cpp {quant.upper()}", nll, path.stat().st_size, pp, tg)
        if args.out is None:
            path.unlink()
    speed_rows = [row for recipe in args.speed_recipe
                  for row in speed_of_shape(recipe, sp, prompt, folder, args)]
    if args.out is None:
        folder.rmdir()

    base = rows[0][1]
    print(f"\n(measured in {time.perf_counter() - t0:.0f}s)\n")
    print("| weights | size MiB | ppl | bits/char | Δ bits/char vs f32 | prompt tok/s | gen tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, nll, size, pp, tg in rows:
        bpc = nll / LN2 / chars
        speed = (f"{pp:,.0f} | {tg:,.0f}" if pp else "— | —")
        print(f"| {name} | {size / 2**20:.2f} | {math.exp(nll / tokens):.3f} | {bpc:.4f} | "
              f"{bpc - base / LN2 / chars:+.4f} | {speed} |")
    if speed_rows:
        print("\n| shape (random weights) | weights | size MiB | prompt tok/s | gen tok/s |\n|---|---|---|---|---|")
        for shape, quant, size, pp, tg in speed_rows:
            print(f"| {shape} | llama.cpp {quant.upper()} | {size / 2**20:.1f} | {pp:,.0f} | {tg:,.1f} |")


def speed_of_shape(recipe: str, sp, prompt, folder: Path, args):
    """llama.cpp speed of each GGUF type for a model of `recipe`'s shape, with N(0, 0.02) weights."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from kslm_jax.core import config as config_lib
    from kslm_jax.export import gguf_io
    from kslm_jax.model import llama
    cfg = config_lib.load(recipe, [])
    c = dataclasses.replace(llama.ModelConfig.from_config(cfg), attention="xla")  # shapes only: any kernel will do
    shapes = jax.eval_shape(llama.Transformer(c).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    shapes = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes["params"],
                          is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.02, s.shape).astype(np.float32), shapes)
    n = sum(x.size for x in jax.tree.leaves(params))
    shape = f"{Path(recipe).stem} ({n / 1e6:.0f}M)"
    rows = []
    for quant in gguf_io.QUANTS:
        path = gguf_io.write_gguf(params, cfg, sp, folder / f"{Path(recipe).stem}-{quant}.gguf", quant)
        pp, tg = llama_speed(path, prompt, args.gen, args.threads, args.repeats)
        rows.append((shape, quant, path.stat().st_size, pp, tg))
        print(f"  {shape} llama.cpp {quant.upper()}: prompt {pp:,.0f} tok/s, generation {tg:,.1f} tok/s", flush=True)
        if args.out is None:
            path.unlink()
    return rows


if __name__ == "__main__":
    main()
