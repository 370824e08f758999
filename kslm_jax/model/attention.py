"""Attention kernels behind one seam: a reference XLA path (any device, the tests' oracle), cuDNN flash (GPU) and
Pallas Splash (TPU).

Shapes: q (B, T, N, H); k, v (B, S, K, H) with N % K == 0 (grouped-query attention).
`causal` is a property of the model (the decoder: True; the masked-LM encoder, model.arch=encoder: False),
passed to `prepare` and `attend`; either way no token sees another document of its packed row.
`prepare` turns positions and segment ids into what the chosen kernel consumes, once per forward pass:
- xla, cudnn: a boolean mask (B, T, S) within each packed document (causal or whole);
- cudnn_packed: per-row segment lengths and offsets (cuDNN's ragged layout, Hopper or newer), so the
  kernel skips work across documents and never reads a T x S mask;
- splash: the segment ids themselves; the kernel masks within each segment (causally or not), block-sparse.
- tokamax_mosaic, tokamax_triton: each query's visible key range (its document's start, and its end when
  not causal), the form of tokamax's flash kernels (Pallas: Mosaic GPU on Hopper, Triton elsewhere).
`auto` picks by the platform at trace time: splash on TPU, cudnn on GPU (xla for float32, which cuDNN lacks),
xla elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)

from kslm_jax.core import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cudnn_packed", "splash", "tokamax_mosaic", "tokamax_triton")
SPLASH_BLOCK = 512   # query and key tile; shorter rows use their full length
SPLASH_LANES = 128   # rows must be a multiple of this
TOKAMAX_ROWS = 128   # tokamax's Mosaic GPU kernel reduces key ranges over query groups of 2 x block_q (64)


def resolve(implementation: str, dtype=None) -> str:
    """The kernel `auto` stands for on the default backend; any other name is returned as it is."""
    if implementation != "auto":
        return implementation
    platform = jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and dtype in (None, jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def packed_mask(q_pos, k_pos, q_seg, k_seg, causal: bool = True):
    """Within a document: same segment id and, when causal, key position not after the query position.

    Padding (segment 0) attends only to padding, so no query row is empty and no softmax sees only -inf;
    no real token attends to padding, and padding's outputs are never read.
    """
    same = q_seg[:, :, None] == k_seg[:, None, :]
    if not causal:
        return same
    return same & (k_pos[:, None, :] <= q_pos[:, :, None])


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


def document_starts(segment_ids):
    """(B, T): the index of the first token of each token's segment. Segments are contiguous runs of one id,
    trailing padding (id 0) included, so a causal kernel that starts each query's keys there sees exactly its
    own document's past."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(change, idx, 0), axis=1)


def document_ends(segment_ids):
    """(B, T): one past the index of the last token of each token's segment (contiguous runs, as above)."""
    return jnp.flip(segment_ids.shape[1] - document_starts(jnp.flip(segment_ids, 1)), 1)


def starts_mask(k_start, k_end=None):
    """The (B, T, T) boolean mask that document ranges stand for: from each query's document start, up to
    itself (causal) or to its document's end (`k_end`, exclusive)."""
    idx = jnp.arange(k_start.shape[1], dtype=k_start.dtype)
    upper = idx[None, None, :] <= idx[None, :, None] if k_end is None else idx[None, None, :] < k_end[:, :, None]
    return (idx[None, None, :] >= k_start[:, :, None]) & upper


def prepare(implementation: str, positions, segment_ids, max_segments: int, causal: bool = True) -> dict:
    implementation = resolve(implementation)
    if implementation == "cudnn_packed":
        return segment_layout(segment_ids, max_segments)
    if implementation.startswith("tokamax"):
        out = {"k_start": document_starts(segment_ids)}
        if not causal:
            out["k_end"] = document_ends(segment_ids)
        return out
    if implementation == "splash":
        return {"segment_ids": segment_ids}
    return {"mask": packed_mask(positions, positions, segment_ids, segment_ids, causal)}


def reference(q, k, v, mask):
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _cudnn_packed(q, k, v, layout, causal: bool):
    # The ragged (offsets) form is not exposed by jax.nn.dot_product_attention; this is the function it
    # calls for implementation="cudnn", with the extra arguments it does not forward.
    from jax._src.cudnn import fused_attention_stablehlo as fa
    return fa.dot_product_attention(
        q, k, v, q_seqlen=layout["seqlen"], kv_seqlen=layout["seqlen"], q_offsets=layout["offsets"],
        kv_offsets=layout["offsets"], scale=q.shape[-1] ** -0.5,
        mask_type=fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING)


def _splash_local(q, k, v, segment_ids, interpret: bool, causal: bool = True):
    """Splash on one device's rows and heads: q (B, T, N, H), k/v (B, S, K, H), segment ids (B, T)."""
    _, t, n, h = q.shape
    s = k.shape[1]
    bq, bkv = min(SPLASH_BLOCK, t), min(SPLASH_BLOCK, s)
    blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                      block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    one = splash_mask.CausalMask((t, s)) if causal else splash_mask.FullMask((t, s))
    mask = splash_mask.MultiHeadMask([one] * n)
    kernel = splash_kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                           interpret=interpret)

    def one_row(q1, k1, v1, seg):
        return kernel(q1, k1, v1, segment_ids=splash_kernel.SegmentIds(q=seg, kv=seg))

    # The kernel takes heads first and applies no scale; causal by row index equals causal by position
    # because packed documents are contiguous, and padding (segment 0) attends to padding as in `reference`.
    # Not causal, the segment ids alone keep each document to itself.
    q = (q * h ** -0.5).astype(q.dtype).swapaxes(1, 2)
    out = jax.vmap(one_row)(q, k.swapaxes(1, 2), v.swapaxes(1, 2), segment_ids)
    return out.swapaxes(1, 2)


def splash(q, k, v, segment_ids, interpret: bool = False, causal: bool = True):
    """Splash attention within packed documents (causal or not), GQA, sharded over batch and heads on the
    current mesh."""
    t, s = q.shape[1], k.shape[1]
    if t % SPLASH_LANES or s % SPLASH_LANES:
        # The kernel tiles rows in multiples of 128 lanes; shorter rows (init's 8-token dummy) take the reference.
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
        return reference(q, k, v, packed_mask(idx, idx, segment_ids, segment_ids, causal))
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, interpret=interpret, causal=causal)
    if mesh.empty:
        return local(q, k, v, segment_ids)
    qkv_spec, seg_spec = sharding.attention_specs(mesh, q.shape[0], k.shape[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


def load_tokamax():
    """tokamax, imported on first use (the kernels extra). Its options are absl flags that it parses from
    sys.argv on first read, which fails under any command line of ours (`kslm train ...`, pytest): they are
    marked parsed, so tokamax keeps its defaults."""
    from absl import flags
    import tokamax
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def tokamax_attend(q, k, v, k_start, kernel: str, k_end=None):
    """tokamax flash attention from each query's document start, causal (k_end None) or up to its document's
    end; kernel: mosaic_gpu | triton | xla (tokamax's own reference, which the CPU tests use)."""
    load_tokamax()
    from tokamax._src.ops.attention import api as tk_api
    from tokamax._src.ops.attention import base as tk_base

    # The public tokamax.dot_product_attention takes only a dense mask; its kernels also take per-query key
    # ranges (Mask.k_start), which skip whole key blocks before a document instead of reading a T x S mask.
    if k_end is None:
        mask = tk_base.Mask(k_start=k_start[:, None, :], is_causal=True)
    else:
        mask = tk_base.Mask(k_start=k_start[:, None, :], k_end=k_end[:, None, :], is_causal=False)
    return tk_api.IMPLEMENTATIONS[kernel](q, k, v, mask=mask, logits_scale=q.shape[-1] ** -0.5)


def attend(q, k, v, inputs: dict, implementation: str = "xla", causal: bool = True):
    implementation = resolve(implementation, q.dtype)
    if implementation.startswith("tokamax"):
        if q.shape[1] % TOKAMAX_ROWS:
            # The Mosaic GPU kernel groups queries by 2 x 64; shorter rows (init's 8-token dummy) take the reference.
            return reference(q, k, v, starts_mask(inputs["k_start"], inputs.get("k_end")))
        kernel = {"tokamax_mosaic": "mosaic_gpu", "tokamax_triton": "triton"}[implementation]
        return tokamax_attend(q, k, v, inputs["k_start"], kernel, inputs.get("k_end"))
    if implementation == "splash":
        return splash(q, k, v, inputs["segment_ids"], causal=causal)
    if implementation == "cudnn_packed":
        return _cudnn_packed(q, k, v, inputs, causal)
    if implementation == "cudnn":
        # is_causal lets the kernel skip blocks above the diagonal; the mask adds the document boundaries.
        return jax.nn.dot_product_attention(q, k, v, mask=inputs["mask"][:, None], is_causal=causal,
                                            implementation="cudnn")
    return reference(q, k, v, inputs["mask"])
