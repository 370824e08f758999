"""Forward + backward time of each attention kernel on packed rows (4 documents per row), bf16, one GPU:
cuDNN with the document mask, cuDNN's ragged layout, tokamax's Mosaic GPU and Triton flash kernels.

    python benchmarks/attention_kernels.py                 # T = 1024 (124M heads) and 2048 (ko_1b heads)
    python benchmarks/attention_kernels.py --jsonl rows.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kslm_jax.model import attention  # noqa: E402

# (name, batch, T, query heads, kv heads, head dim): 16k tokens each, as the train-step benchmarks use.
SHAPES = [("gpt2-124m", 16, 1024, 12, 12, 64), ("ko_1b", 8, 2048, 16, 4, 128)]
KERNELS = ("cudnn", "cudnn_packed", "tokamax_mosaic", "tokamax_triton")


def packed_ids(rng, b, t, docs=4):
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        bounds = [0, *np.sort(rng.choice(np.arange(1, t), docs - 1, replace=False)), t]
        for d in range(docs):
            seg[r, bounds[d]:bounds[d + 1]] = d + 1
            pos[r, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    return jnp.asarray(pos), jnp.asarray(seg)


def time_kernel(impl, q, k, v, pos, seg, reps: int):
    inputs = attention.prepare(impl, pos, seg, 8)
    f = jax.jit(jax.value_and_grad(lambda q_, k_, v_: attention.attend(q_, k_, v_, inputs, impl)
                                   .astype(jnp.float32).sum(), (0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(f(q, k, v))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'shape':<11s}{'B x T':>11s}{'heads':>8s}{'kernel':>16s}{'fwd+bwd ms':>12s}{'compile s':>11s}")
    for name, b, t, n, kv, h in SHAPES:
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.bfloat16)
        pos, seg = packed_ids(rng, b, t)
        for impl in KERNELS:
            try:
                ms, compile_s = time_kernel(impl, q, k, v, pos, seg, args.reps)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape is a row, not the end
                print(f"{name:<11s}{f'{b}x{t}':>11s}{f'{n}/{kv}':>8s}{impl:>16s}  failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}", flush=True)
                continue
            print(f"{name:<11s}{f'{b}x{t}':>11s}{f'{n}/{kv}':>8s}{impl:>16s}{ms:>12.2f}{compile_s:>11.1f}", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(dict(kind="attention", shape=name, batch=b, seq=t, heads=n, kv_heads=kv,
                                            head_dim=h, kernel=impl, fwd_bwd_ms=ms, compile_s=compile_s,
                                            device=jax.devices()[0].device_kind)) + "\n")


if __name__ == "__main__":
    main()
