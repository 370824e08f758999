"""Sequence classification: a linear head on each example's pooled final states (its last token for the
decoder, its first token, the BOS, or the mean of its tokens for the encoder: finetune.pool), or label-word
scoring (the decoder's next-token logits for one word per class after the prompt).

Examples are packed several to a row; `cls_index` (B, M) holds the position of each one's last token and
`cls_label` (B, M) its class, -1 for empty slots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import attention, llama

POOLS = ("first", "last", "mean")


def init_head(rng, d_model: int, n_classes: int) -> dict:
    return {"kernel": jax.random.normal(rng, (d_model, n_classes), jnp.float32) * 0.02,
            "bias": jnp.zeros((n_classes,), jnp.float32)}


def label_word_ids(sp, words: str, n_classes: int) -> np.ndarray:
    """The first piece of each label word (a lone word-boundary piece skipped); they must differ."""
    names = [w.strip() for w in words.split(",") if w.strip()]
    if len(names) != n_classes:
        raise KslmError(f"config key finetune.label_words={words!r}: give one word per class ({n_classes})")
    ids = []
    for w in names:
        pieces = [i for i in sp.EncodeAsIds(w) if sp.IdToPiece(i) != "▁"]
        if not pieces or pieces[0] == tok_lib.UNK:
            raise KslmError(f"config key finetune.label_words: {w!r} has no piece in this tokenizer")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        shown = ", ".join(f"{w}→{sp.IdToPiece(i)}" for w, i in zip(names, ids))
        raise KslmError(f"config key finetune.label_words: the words share a first piece ({shown}); choose words "
                        "that start differently")
    return np.asarray(ids, np.int32)


def gather(hidden_BTD, index_BM):
    return jnp.take_along_axis(hidden_BTD, index_BM[..., None], axis=1)


def pool_of(cfg) -> str:
    """finetune.pool with `auto` resolved: the first token (BOS) of an encoder, the last of a decoder."""
    if cfg.finetune.pool != "auto":
        return cfg.finetune.pool
    return "first" if cfg.model.arch == "encoder" else "last"


def pool(hidden_BTD, batch, how: str):
    """(B, M, D) one state per example slot: its first or last token's, or the mean over its tokens."""
    last = batch["cls_index"]
    if how == "last":
        return gather(hidden_BTD, last)
    seg = batch["segment_ids"]
    if how == "first":
        return gather(hidden_BTD, jnp.take_along_axis(attention.document_starts(seg), last, axis=1))
    # Mean: the tokens whose segment id is that of the slot's last token (empty slots read row padding or
    # an example, and their label is -1, so the loss never sees them).
    slot_seg = jnp.take_along_axis(seg, last, axis=1)                                    # (B, M)
    w = ((seg[:, None, :] == slot_seg[:, :, None]) & (seg[:, None, :] > 0)).astype(jnp.float32)  # (B, M, T)
    total = jnp.einsum("bmt,btd->bmd", w, hidden_BTD.astype(jnp.float32))
    return total / jnp.maximum(w.sum(-1, keepdims=True), 1.0)


def logits(hidden_BMD, lm_params, head, word_ids, c: llama.ModelConfig):
    """(B, M, C) class scores in float32."""
    h = hidden_BMD.astype(jnp.float32)
    if head is not None:
        return h @ head["kernel"] + head["bias"]
    kernel = llama.output_kernel(lm_params, c).astype(jnp.float32)
    return h @ kernel[:, word_ids]


def loss_sums(logits_BMC, labels_BM):
    valid = labels_BM >= 0
    lse = jax.nn.logsumexp(logits_BMC, axis=-1)
    picked = jnp.take_along_axis(logits_BMC, jnp.maximum(labels_BM, 0)[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, lse - picked, 0.0)
    correct = jnp.where(valid, jnp.argmax(logits_BMC, -1) == labels_BM, False)
    return {"ce_sum": ce.sum(), "z_sum": jnp.zeros((), jnp.float32), "tokens": valid.sum(),
            "correct_sum": correct.sum().astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("model", "how"))
def predict(model, lm_params, head, word_ids, batch, how: str = "last"):
    """(B, M, C) class scores of a packed batch, with plain (merged) parameters; `how`: pool_of(cfg)."""
    hidden = model.apply({"params": lm_params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    return logits(pool(hidden, batch, how), lm_params, head, word_ids, model.c)
