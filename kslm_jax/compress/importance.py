"""Importance scores for pruning, measured by running a model over calibration batches.

One float32 forward pass, layer by layer, written with the model's own pieces (rope, the reference
attention, RMSNorm's formula) so every intermediate is at hand; tests check it reproduces the model's logits.
Scores, each a mean over real (segment id > 0) tokens:
- block influence per layer, 1 - cos(h_in, h_out) (ShortGPT, Men et al. 2024): low means the layer barely
  changes the residual stream;
- per MLP channel, |silu(gate) * up| (Minitron, Muralidharan et al. 2024);
- per attention head, the L2 norm of its contribution to the residual stream (its slice of o_proj applied
  to its output);
- per embedding channel, |x| after every RMSNorm of the network, summed over the norms (Minitron).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.model import attention, llama


def layers_of(params: dict, c: llama.ModelConfig) -> list[dict]:
    """Per-layer parameter dicts, from either layout (scanned stack or layers_<i>)."""
    if c.scan_layers:
        return [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(c.n_layers)]
    return [params[f"layers_{i}"] for i in range(c.n_layers)]


def _rms(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _layer(c: llama.ModelConfig, p, x, positions, mask, real):
    """One block in float32; returns its output and this batch's sums of every score."""
    n = jnp.maximum(real.sum(), 1)
    h = _rms(x, p["input_layernorm"]["scale"], c.norm_eps)
    a = p["self_attn"]
    q = llama.rope(jnp.einsum("btd,dnh->btnh", h, a["q_proj"]["kernel"]), positions, c.rope_theta)
    k = llama.rope(jnp.einsum("btd,dkh->btkh", h, a["k_proj"]["kernel"]), positions, c.rope_theta)
    v = jnp.einsum("btd,dkh->btkh", h, a["v_proj"]["kernel"])
    out = attention.reference(q, k, v, mask)
    per_head = jnp.einsum("btnh,nhd->btnd", out, a["o_proj"]["kernel"])
    head = jnp.sum(jnp.linalg.norm(per_head, axis=-1) * real[..., None], axis=(0, 1))
    x1 = x + per_head.sum(axis=2)
    h2 = _rms(x1, p["post_attention_layernorm"]["scale"], c.norm_eps)
    m = p["mlp"]
    act = jax.nn.silu(h2 @ m["gate_proj"]["kernel"]) * (h2 @ m["up_proj"]["kernel"])
    mlp = jnp.sum(jnp.abs(act) * real[..., None], axis=(0, 1))
    x2 = x1 + act @ m["down_proj"]["kernel"]
    cos = jnp.sum(x * x2, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x2, axis=-1) + 1e-12)
    bi = jnp.sum((1.0 - cos) * real)
    emb = jnp.sum((jnp.abs(h) + jnp.abs(h2)) * real[..., None], axis=(0, 1))
    return x2, {"bi": bi / n, "mlp": mlp / n, "head": head / n, "emb": emb / n}


@functools.lru_cache(maxsize=4)
def _compiled_layer(c: llama.ModelConfig):
    return jax.jit(functools.partial(_layer, c))


def forward(params: dict, c: llama.ModelConfig, batch: dict):
    """Logits (float32) and this batch's scores: per-layer lists plus the embedding channel scores."""
    layer = _compiled_layer(c)
    inputs, positions, seg = (jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    real = (seg > 0).astype(jnp.float32)
    mask = attention.packed_mask(positions, positions, seg, seg)
    x = jnp.asarray(params["embed_tokens"]["embedding"], jnp.float32)[inputs]
    scores = {"bi": [], "mlp": [], "head": [], "emb": 0.0}
    for p in layers_of(params, c):
        x, s = layer(p, x, positions, mask, real)
        for key in ("bi", "mlp", "head"):
            scores[key].append(s[key])
        scores["emb"] = scores["emb"] + s["emb"]
    x = _rms(x, params["norm"]["scale"], c.norm_eps)
    scores["emb"] = scores["emb"] + jnp.sum(jnp.abs(x) * real[..., None], axis=(0, 1)) / jnp.maximum(real.sum(), 1)
    logits = x @ llama.output_kernel(params, c)
    return logits, scores


def measure(params: dict, c: llama.ModelConfig, batches) -> dict:
    """Scores averaged over the calibration batches, as numpy arrays: bi (L,), mlp (L, F), head (L, N), emb (D,)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    total, count = None, 0
    for b in batches:
        _, s = forward(params, c, b)
        s = {"bi": np.stack(s["bi"]), "mlp": np.stack(s["mlp"]), "head": np.stack(s["head"]),
             "emb": np.asarray(s["emb"])}
        total = s if total is None else {k: total[k] + s[k] for k in s}
        count += 1
    if not count:
        raise ValueError("no calibration batches")
    return {k: np.asarray(v, np.float64) / count for k, v in total.items()}
