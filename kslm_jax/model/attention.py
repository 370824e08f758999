"""Attention kernels behind one seam: a reference XLA path (any device, the tests' oracle) and cuDNN flash.

Shapes: q (B, T, N, H); k, v (B, S, K, H) with N % K == 0 (grouped-query attention); mask (B, T, S) bool.
A TPU Splash kernel would be one more branch of `attend`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_mask(q_pos, k_pos, q_seg, k_seg):
    """Causal within a document: same segment id and key position not after the query position.

    Padding (segment 0) attends only to padding, so no query row is empty and no softmax sees only -inf.
    """
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return same & causal


def reference(q, k, v, mask):
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def attend(q, k, v, mask, implementation: str = "xla"):
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    return reference(q, k, v, mask)
