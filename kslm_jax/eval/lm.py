"""Held-out perplexity, bits per character and per byte, and the unigram baseline they are judged against.

Accounting: every document is [BOS] text [EOS]; each token after BOS is predicted once, and EOS counts as
one character (and one byte), the separator between documents. The unigram baseline predicts the same
tokens from training-split frequencies (add-one smoothed), so the two numbers are directly comparable.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kslm_jax.core import progress, sharding
from kslm_jax.core.errors import KslmError
from kslm_jax.data import shards

LN2 = math.log(2.0)


def summarize(nll_sum: float, tokens: int, manifest_split: dict) -> dict:
    """Loss, perplexity, and bits per char/byte scaled by the split's predicted tokens per char."""
    if tokens == 0:
        raise KslmError("the validation split is empty; raise data.val_fraction or add text, then prepare again")
    nll = nll_sum / tokens
    predicted = manifest_split["tokens"] - manifest_split["docs"]
    chars = manifest_split["chars"] + manifest_split["docs"]
    nbytes = manifest_split.get("bytes", manifest_split["chars"]) + manifest_split["docs"]
    return {
        "loss": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "bits_per_char": nll / LN2 * predicted / chars,
        "bits_per_byte": nll / LN2 * predicted / nbytes,
        "tokens": int(tokens),
    }


def run_lm_eval(eval_fn, params, batches, mesh, total: int | None = None) -> tuple[float, int]:
    """Summed NLL and predicted tokens over `batches`; `total` (predicted tokens expected) gives the bar an ETA."""
    nll, tokens = 0.0, 0
    pending = None
    with progress.bar(total, "eval", "tok", scale=True) as shown:
        for b in batches:
            out = eval_fn(params, sharding.global_batch(b, mesh, 1))
            if pending is not None:  # read one batch behind, so the device never waits on the host
                nll, tokens = nll + float(pending["ce_sum"]), tokens + int(pending["tokens"])
                shown.update(int(pending["tokens"]))
            pending = out
        if pending is not None:
            nll, tokens = nll + float(pending["ce_sum"]), tokens + int(pending["tokens"])
    return nll, tokens


def predicted_tokens(manifest_split: dict, max_batches: int = 0, rows: int = 0, seq_len: int = 0) -> int:
    """Tokens an eval pass predicts (every token after a document's BOS), capped by train.eval_batches."""
    n = manifest_split["tokens"] - manifest_split["docs"]
    return min(n, max_batches * rows * seq_len) if max_batches else n


def _token_arrays(tokens_dir: Path, split: str):
    from array_record.python import array_record_module
    for f in shards.shard_files(tokens_dir, split):
        reader = array_record_module.ArrayRecordReader(str(f))
        n = reader.num_records()
        for start in range(0, n, 4096):
            for rec in reader.read(list(range(start, min(n, start + 4096)))):
                yield np.frombuffer(rec, shards.TOKEN_DTYPE)
        reader.close()


def unigram_baseline(tokens_dir: Path, vocab_size: int) -> dict:
    """Bits per character of a unigram model fitted on the training split's predicted tokens."""
    counts = np.ones(vocab_size, np.float64)
    for ids in _token_arrays(tokens_dir, "train"):
        counts += np.bincount(ids[1:], minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    nll, n = 0.0, 0
    for ids in _token_arrays(tokens_dir, "val"):
        nll -= logp[ids[1:]].sum()
        n += len(ids) - 1
    manifest = shards.read_manifest(tokens_dir)
    return summarize(nll, n, manifest["val"])


def format_table(rows: dict[str, dict]) -> str:
    lines = [f"{'model':28s}{'loss':>8s}{'ppl':>10s}{'bits/char':>11s}{'bits/byte':>11s}"]
    for name, r in rows.items():
        lines.append(f"{name:28s}{r['loss']:>8.3f}{r['perplexity']:>10.2f}{r['bits_per_char']:>11.3f}"
                     f"{r['bits_per_byte']:>11.3f}")
    return "\n".join(lines)
