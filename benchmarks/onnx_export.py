"""ONNX exporters side by side on one random model: export time, file size, onnxruntime latency, max |logit diff|.

    python benchmarks/onnx_export.py [--baseline OLD_ONNX_IO.py] [--jax2onnx]

`torch` is kslm_jax.export.onnx_io (torch.onnx's exporter applied to our Hugging Face model). --baseline loads
another onnx_io.py that has the same write_onnx(params, config, tokenizer, out) (the hand-built graph of commit
c16e3de: `git show c16e3de:kslm_jax/export/onnx_io.py > /tmp/hand_onnx_io.py`). --jax2onnx converts the JAX
forward pass with jax2onnx (static shapes, unscanned layers), if it is installed. Latency: a 128-token prompt,
then 16 next tokens one by one (through the KV cache where the graph has one, else the whole prefix again).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# The tests' random_params, and not this folder first on the path: benchmarks/tokenizers.py would shadow the
# tokenizers package that transformers imports.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "tests")
from conftest import random_params  # noqa: E402

from kslm_jax.export import onnx_io  # noqa: E402
from kslm_jax.model import llama  # noqa: E402

PROMPT, NEW = 128, 16


def _size(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 2**20


def _session(path: Path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _decode_ms(step, ids) -> tuple[float, float]:
    """(prompt ms, ms per next token), best of three."""
    prompt, per = [], []
    for _ in range(3):
        t = time.perf_counter()
        state = step(ids[:, :PROMPT], None)
        prompt.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(PROMPT, PROMPT + NEW):
            state = step(ids[:, i:i + 1], state)
        per.append((time.perf_counter() - t) / NEW)
    return 1e3 * min(prompt), 1e3 * min(per)


def torch_row(params, c, tok, tmp, ids, ref):
    t = time.perf_counter()
    out = onnx_io.write_onnx(params, c, tok, tmp / "torch")
    export_s = time.perf_counter() - t
    s = _session(out / "model.onnx")
    names = onnx_io.cache_names(c.n_layers)

    def step(new, past):
        if past is None:
            past = [np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)] * len(names)
        mask = np.ones((1, past[0].shape[2] + new.shape[1]), np.int64)
        res = s.run(None, {"input_ids": new, "attention_mask": mask, **dict(zip(names, past))})
        step.logits = res[0]
        return res[1:]

    step(ids[:, :PROMPT], None)
    diff = float(np.abs(step.logits - ref).max())
    return ("torch.onnx (dynamo) on the HF model", export_s, _size(out), *_decode_ms(step, ids), diff, "yes")


def baseline_row(path, params, c, tok, tmp, ids, ref):
    spec = importlib.util.spec_from_file_location("hand_onnx_io", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = time.perf_counter()
    out = mod.write_onnx(params, c, tok, tmp / "hand")
    export_s = time.perf_counter() - t
    s = _session(out / "model.onnx")
    seen = {}

    def step(new, prefix):
        prefix = new if prefix is None else np.concatenate([prefix, new], axis=1)
        seen["logits"] = s.run(["logits"], {"input_ids": prefix})[0]
        return prefix

    step(ids[:, :PROMPT], None)
    diff = float(np.abs(seen["logits"] - ref).max())
    return ("hand-built graph (c16e3de)", export_s, _size(out), *_decode_ms(step, ids), diff, "no")


def jax2onnx_row(params, c, tmp, ids, ref):
    import jax2onnx
    import onnx
    flat = llama.ModelConfig(**{**c.__dict__, "scan_layers": False})
    model, flat_params = random_params(flat, seed=0, std=0.3)
    fn = lambda x: model.apply({"params": flat_params}, x)  # noqa: E731
    t = time.perf_counter()
    proto = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct((1, PROMPT), jnp.int32)])
    (tmp / "j2o").mkdir()
    onnx.save_model(proto, str(tmp / "j2o" / "model.onnx"))
    export_s = time.perf_counter() - t
    s = _session(tmp / "j2o" / "model.onnx")
    x = ids[:, :PROMPT].astype(np.int32)
    got = s.run(None, {s.get_inputs()[0].name: x})[0]
    diff = float(np.abs(got - np.asarray(jax.jit(fn)(x))).max())
    prompt_ms = []
    for _ in range(3):
        t = time.perf_counter()
        s.run(None, {s.get_inputs()[0].name: x})
        prompt_ms.append(1e3 * (time.perf_counter() - t))
    # One fixed input shape: there is no next-token call to time.
    return ("jax2onnx on the JAX model (static shape)", export_s, _size(tmp / "j2o"), min(prompt_ms), float("nan"),
            diff, "no")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="an onnx_io.py with the hand-built write_onnx, to compare against")
    ap.add_argument("--jax2onnx", action="store_true", help="also convert with jax2onnx")
    args = ap.parse_args()
    c = llama.ModelConfig(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                          d_ff=704, tie_embeddings=True)
    model, params = random_params(c, seed=0, std=0.3)
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (1, PROMPT + NEW)).astype(np.int64)
    ref = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids[:, :PROMPT])))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = tmp / "tok.model"
        tok.write_bytes(b"stand-in")
        rows = [torch_row(params, c, tok, tmp, ids, ref)]
        if args.baseline:
            rows.append(baseline_row(args.baseline, params, c, tok, tmp, ids, ref))
        if args.jax2onnx:
            rows.append(jax2onnx_row(params, c, tmp, ids, ref))
    print(f"model: vocab {c.vocab_size}, d {c.d_model}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads, "
          f"tied; prompt {PROMPT} tokens, then {NEW} one by one; onnxruntime CPU")
    print("| exporter | export s | MiB | prompt ms | ms/next token | max abs logit diff vs JAX | KV cache + mask |")
    print("|---|---|---|---|---|---|---|")
    for name, export_s, mib, prompt_ms, tok_ms, diff, cache in rows:
        print(f"| {name} | {export_s:.1f} | {mib:.1f} | {prompt_ms:.1f} | {tok_ms:.2f} | {diff:.1e} | {cache} |")


if __name__ == "__main__":
    main()
