"""Tokens/s, step time, MFU, peak memory and compile time of the real train step, printed as a table.

    python benchmarks/train_throughput.py --config configs/ko_125m.py --batch 16
    python benchmarks/train_throughput.py --preset gpt2-124m --batch 16 --batch 32
    python benchmarks/train_throughput.py --config configs/tiny_ko.py --steps 5   # works on CPU too

Batches are random tokens packed as several documents per row (segment ids and restarting positions), so
the masked attention path is the one timed. Presets use vocab 50304, as nanoGPT does, for a fair comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kslm_jax.core import config as config_lib  # noqa: E402
from kslm_jax.core import metrics, sharding
from kslm_jax.model import arch  # noqa: E402
from kslm_jax.objectives import lm  # noqa: E402
from kslm_jax.train import optim  # noqa: E402
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib

PRESETS = {  # GPT-2 shapes with Llama blocks, tied embeddings (SwiGLU at 8d/3 keeps the MLP FLOPs of GPT-2's 4d)
    "gpt2-124m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048),
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2752),
    "gpt2-xl": dict(d_model=1600, n_layers=48, n_heads=25, n_kv_heads=25, d_ff=4288),
}


def build_config(args, extra=()):
    cfg = config_lib.load(args.config)
    if args.preset:
        with cfg.unlocked():
            for k, v in PRESETS[args.preset].items():
                cfg.model[k] = v
            cfg.tokenizer.vocab_size = 50304
            cfg.model.tie_embeddings = True
            cfg.data.seq_len = 1024
            cfg.model.dtype = "bfloat16"
            cfg.model.attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    for item in [*args.override, *extra]:
        config_lib.apply_override(cfg, item)
    config_lib.validate(cfg)
    return cfg


def packed_batch(rng, batch, seq, vocab, docs_per_row=4):
    tokens = rng.integers(4, vocab, (batch, seq), dtype=np.int32)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), docs_per_row - 1, replace=False))
        bounds = [0, *cuts, seq]
        for d in range(docs_per_row):
            seg[r, bounds[d]:bounds[d + 1]] = d + 1
            pos[r, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    return {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "positions": pos, "segment_ids": seg}


def peak_memory_gb() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def setup(cfg, batch: int):
    """The compiled-on-first-call train step, a fresh sharded state and two device batches."""
    with cfg.unlocked():
        cfg.train.batch_size = batch
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules(cfg.mesh.rules)  # dp | fsdp | fsdp_tp, as kslm train shards the state
    mc, model = arch.from_config(cfg)  # the decoder, or a recurrent model with --override model.arch=gru
    tx, lr_fn = optim.make(cfg.optim, 1000)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, 0, mesh, rules)
    loss = lm.loss(model, cfg.train.z_loss, cfg.train.loss_chunk, cfg.train.loss_impl)
    step_fn = step_lib.jit_train_step(loss, tx, lr_fn, cfg.train.grad_accum, mesh, shardings, rules=rules)
    state = state_lib.create(model, tx, 0, mesh, shardings, rules)
    rng = np.random.default_rng(0)
    host = [packed_batch(rng, batch, cfg.data.seq_len, cfg.tokenizer.vocab_size) for _ in range(2)]
    with jax.set_mesh(mesh):
        batches = [sharding.global_batch(b, mesh, cfg.train.grad_accum) for b in host]
    return dict(mesh=mesh, model_cfg=mc, step_fn=step_fn, state=state, batches=batches,
                n_params=sum(x.size for x in jax.tree.leaves(abstract.params)))


def run(cfg, batch: int, steps: int, warmup: int) -> dict:
    t_setup = time.perf_counter()
    s = setup(cfg, batch)
    setup_s = time.perf_counter() - t_setup
    step_fn, state, batches, mesh = s["step_fn"], s["state"], s["batches"], s["mesh"]
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batches[0], None).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        step_fn = compiled
        state, out = step_fn(state, batches[0], None)
        jax.block_until_ready(out)
        for i in range(warmup):
            state, out = step_fn(state, batches[i % 2], None)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for i in range(steps):
            state, out = step_fn(state, batches[i % 2], None)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / steps
    tokens = batch * cfg.data.seq_len
    peak = metrics.device_peak_tflops(cfg.logging.peak_tflops)
    flops = arch.flops_per_token(s["model_cfg"], cfg.data.seq_len) * tokens
    loss = float(out["ce_sum"]) / max(int(out["tokens"]), 1)
    return dict(params_m=s["n_params"] / 1e6, batch=batch, seq=cfg.data.seq_len, tokens_per_s=tokens / dt,
                step_ms=dt * 1e3, mfu=(flops / dt / (mesh.size * peak * 1e12)) if peak else None,
                peak_gb=peak_memory_gb(), compile_s=compile_s, setup_s=setup_s, loss=loss,
                temp_gb=None if mem is None else mem.temp_size_in_bytes / 2**30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="recipe file (default: base config)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="nanoGPT comparison shape")
    ap.add_argument("--batch", type=int, action="append", help="global batch (repeatable)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--override", action="append", default=[], help="section.key=value (repeatable)")
    ap.add_argument("--jsonl", default=None, help="append one JSON row per batch size here")
    ap.add_argument("--label", default="", help="name of this row in the JSON rows")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=key=value,key=value: one more row set with these overrides on top (repeatable); "
                         "a variant that fails prints its error and the others still run")
    ap.add_argument("--skip-base", action="store_true", help="run the variants only, not the base row")
    args = ap.parse_args()
    rows = []
    cfg = build_config(args)
    name = args.preset or Path(args.config or "base").stem
    dev = (f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, mesh "
           f"{dict(zip(('data', 'fsdp', 'tensor'), sharding.mesh_shape(cfg.mesh, jax.device_count())))} "
           f"rules {cfg.mesh.rules}")
    variants = [] if args.skip_base else [(args.label or "base", [])]
    variants += [(v.split("=", 1)[0], v.split("=", 1)[1].split(",")) for v in args.variant]
    for label, extra in variants:
        for b in args.batch or [None]:
            t_row = time.perf_counter()
            try:
                vcfg = build_config(args, extra)
                rows.append(dict(run(vcfg, b or vcfg.train.batch_size, args.steps, args.warmup), label=label,
                                 overrides=[*args.override, *extra]))
                r = rows[-1]
                # Each row as soon as it is measured: a run cut off by a time limit keeps what it finished.
                print(f"row {label} batch {r['batch']}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step, "
                      f"compile {r['compile_s']:.1f} s, setup {r['setup_s']:.1f} s, row {time.perf_counter() - t_row:.0f} s",
                      flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(dict(r, impl="ours", shape=name, device=dev)) + "\n")
            except Exception as e:  # noqa: BLE001 - one lever's failure is a row of the report, not the end of it
                print(f"variant {label!r} batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            jax.clear_caches()
    print(f"\n{name} on {dev}")
    print(f"{'variant':<14s}{'params(M)':>10s}{'batch':>7s}{'seq':>6s}{'tokens/s':>12s}{'step ms':>10s}{'MFU':>7s}"
          f"{'peak GB':>9s}{'temp GB':>9s}{'compile s':>10s}{'loss':>8s}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
        temp = f"{r['temp_gb']:.1f}" if r["temp_gb"] is not None else "n/a"
        print(f"{r['label'][:13]:<14s}{r['params_m']:>10.1f}{r['batch']:>7d}{r['seq']:>6d}{r['tokens_per_s']:>12,.0f}"
              f"{r['step_ms']:>10.1f}{mfu:>7s}{peak:>9s}{temp:>9s}{r['compile_s']:>10.1f}{r['loss']:>8.3f}")


if __name__ == "__main__":
    main()
