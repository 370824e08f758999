"""Attention kernels behind one seam: a reference XLA path (any device, the tests' oracle) and cuDNN flash.

Shapes: q (B, T, N, H); k, v (B, S, K, H) with N % K == 0 (grouped-query attention).
`prepare` turns positions and segment ids into what the chosen kernel consumes, once per forward pass:
- xla, cudnn: a boolean mask (B, T, S), causal within each packed document;
- cudnn_packed: per-row segment lengths and offsets (cuDNN's ragged layout, Hopper or newer), so the
  kernel skips work across documents and never reads a T x S mask.
A TPU Splash kernel would be one more branch here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "cudnn_packed")


def packed_mask(q_pos, k_pos, q_seg, k_seg):
    """Causal within a document: same segment id and key position not after the query position.

    Padding (segment 0) attends only to padding, so no query row is empty and no softmax sees only -inf.
    """
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return same & causal


def segment_layout(segment_ids, max_segments: int) -> dict:
    """Lengths and start offsets of the contiguous segments of each row, -1 where a row has fewer.

    Padding (id 0, always at the end of a row) becomes one more segment, so every position belongs to a
    segment and the kernel writes every output. Rows may hold at most max_segments documents.
    """
    b, t = segment_ids.shape
    m = max_segments + 1
    seg = jnp.where(segment_ids == 0, m, segment_ids)
    onehot = seg[:, :, None] == jnp.arange(1, m + 1, dtype=seg.dtype)[None, None, :]   # (B, T, M)
    lengths = onehot.sum(axis=1, dtype=jnp.int32)
    starts = jnp.argmax(onehot, axis=1).astype(jnp.int32)
    present = lengths > 0
    # Shift present segments left so that row r lists its segments first, padding slot included.
    order = jnp.argsort(~present, axis=1, stable=True)
    lengths = jnp.take_along_axis(jnp.where(present, lengths, -1), order, axis=1)
    starts = jnp.take_along_axis(jnp.where(present, starts, -1), order, axis=1)
    offsets = jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return {"seqlen": lengths, "offsets": offsets}


def prepare(implementation: str, positions, segment_ids, max_segments: int) -> dict:
    if implementation == "cudnn_packed":
        return segment_layout(segment_ids, max_segments)
    return {"mask": packed_mask(positions, positions, segment_ids, segment_ids)}


def reference(q, k, v, mask):
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _cudnn_packed(q, k, v, layout):
    # The ragged (offsets) form is not exposed by jax.nn.dot_product_attention; this is the function it
    # calls for implementation="cudnn", with the extra arguments it does not forward.
    from jax._src.cudnn import fused_attention_stablehlo as fa
    return fa.dot_product_attention(
        q, k, v, q_seqlen=layout["seqlen"], kv_seqlen=layout["seqlen"], q_offsets=layout["offsets"],
        kv_offsets=layout["offsets"], scale=q.shape[-1] ** -0.5, mask_type=fa.MaskType.PADDING_CAUSAL)


def attend(q, k, v, inputs: dict, implementation: str = "xla"):
    if implementation == "cudnn_packed":
        return _cudnn_packed(q, k, v, inputs)
    if implementation == "cudnn":
        # is_causal lets the kernel skip blocks above the diagonal; the mask adds the document boundaries.
        return jax.nn.dot_product_attention(q, k, v, mask=inputs["mask"][:, None], is_causal=True,
                                            implementation="cudnn")
    return reference(q, k, v, inputs["mask"])
