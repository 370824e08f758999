"""The model side of evaluation: log-likelihoods of packed sequences, mean final states, greedy answers.

Every function takes plain decoder parameters (LoRA adapters merged) and batches of a fixed shape, so each
compiles once per model. Log-likelihoods pack many short requests into a row with segment ids, exactly as
training packs examples; greedy decoding recomputes the whole window each token (small models, no cache to
keep per row) and stops a row at any stop id.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core import progress
from kslm_jax.data import examples as ex_lib
from kslm_jax.model import llama


@functools.partial(jax.jit, static_argnames=("model",))
def token_logprobs(model, params, batch):
    """log p(target) at every position (B, T), float32."""
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = logits.astype(jnp.float32)
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("model",))
def final_states(model, params, batch):
    return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                       return_hidden=True).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "vocab_limit"))
def next_ids(model, params, tokens, segment_ids, last, vocab_limit: int):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden = model.apply({"params": params}, tokens, positions, segment_ids, return_hidden=True)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    logits = h @ llama.output_kernel(params, model.c).astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return jnp.argmax(logits, axis=-1)


def _per_segment(values, weights, segment_ids, max_segments: int) -> np.ndarray:
    """Sums of values*weights per (row, segment): (B, max_segments + 1), column s+1 for segment s."""
    b = values.shape[0]
    out = np.zeros((b, max_segments + 1), np.float64)
    rows = np.repeat(np.arange(b), values.shape[1])
    np.add.at(out, (rows, segment_ids.reshape(-1)), (values * weights).reshape(-1))
    return out


class Scorer:
    def __init__(self, model: llama.Transformer, seq_len: int, rows: int, vocab_limit: int, max_segments: int = 64):
        self.model, self.seq_len, self.rows = model, seq_len, rows
        self.vocab_limit, self.max_segments = vocab_limit, max_segments
        self.label = "eval"  # what the progress bar names: the task being scored

    def example_logprobs(self, params, ex: ex_lib.ExampleSet) -> tuple[np.ndarray, np.ndarray]:
        """(sum of log p over each example's flagged targets, their count); examples in `lm` layout."""
        sums, counts = np.zeros(len(ex)), np.zeros(len(ex), np.int64)
        order = np.argsort(-ex.lengths, kind="stable")  # longest first packs rows tighter
        shown = progress.bar(len(ex), self.label, "seq")
        for batch, plan in ex_lib.one_pass(ex, self.rows, self.seq_len, self.max_segments, order):
            lp = np.asarray(token_logprobs(self.model, params, batch))
            shown.update(sum(map(len, plan)))
            mask = batch["loss_mask"]
            s = _per_segment(lp, mask, batch["segment_ids"], self.max_segments)
            c = _per_segment(np.ones_like(lp), mask, batch["segment_ids"], self.max_segments)
            for r, row in enumerate(plan):
                for j, e in enumerate(row):
                    sums[e], counts[e] = s[r, j + 1], c[r, j + 1]
        shown.close()
        return sums, counts

    def loglik(self, params, requests) -> tuple[np.ndarray, np.ndarray]:
        """log p(continuation | context) for (context ids with BOS, continuation ids) pairs; a pair longer
        than the window loses context tokens from the left."""
        seqs, flags = [], []
        for ctx, cont in requests:
            ids, fl = list(ctx) + list(cont), [0] * len(ctx) + [1] * len(cont)
            seqs.append(ids[-(self.seq_len + 1):])
            flags.append(fl[-(self.seq_len + 1):])
        return self.example_logprobs(params, ex_lib.ExampleSet(seqs, flags, None, "lm"))

    def mean_states(self, params, seqs) -> np.ndarray:
        """Mean final (normed) state over each sequence's tokens, (n, d_model)."""
        seqs = [s[: self.seq_len] for s in seqs]
        ex = ex_lib.ExampleSet(seqs, None, None, "cls")
        out = np.zeros((len(seqs), self.model.c.d_model))
        shown = progress.bar(len(seqs), self.label, "seq")
        for batch, plan in ex_lib.one_pass(ex, self.rows, self.seq_len, self.max_segments):
            h = np.asarray(final_states(self.model, params, batch))
            shown.update(sum(map(len, plan)))
            seg = batch["segment_ids"]
            for r, row in enumerate(plan):
                for j, e in enumerate(row):
                    out[e] = h[r][seg[r] == j + 1].mean(axis=0)
        shown.close()
        return out

    def greedy(self, params, prompts, max_new: int, stop_ids=()) -> list[list[int]]:
        """Greedy continuations (without the stop id) of each prompt; a prompt too long for the window
        keeps its last tokens."""
        t, outs = self.seq_len, []
        shown = progress.bar(len(prompts), self.label, "prompt")
        for start in range(0, len(prompts), self.rows):
            chunk = prompts[start: start + self.rows]
            tokens = np.zeros((self.rows, t), np.int32)
            seg = np.zeros((self.rows, t), np.int32)
            lengths = np.ones(self.rows, np.int64)
            new = [[] for _ in chunk]
            done = [False] * self.rows
            for r, p in enumerate(chunk):
                p = list(p)[-max(t - max_new, 1):]
                tokens[r, :len(p)], seg[r, :len(p)], lengths[r] = p, 1, len(p)
            for r in range(len(chunk), self.rows):
                seg[r, 0], done[r] = 1, True
            for _ in range(max_new):
                nxt = np.asarray(next_ids(self.model, params, tokens, seg, lengths - 1, self.vocab_limit))
                for r in range(len(chunk)):
                    if done[r]:
                        continue
                    if int(nxt[r]) in stop_ids:
                        done[r] = True
                        continue
                    new[r].append(int(nxt[r]))
                    if lengths[r] == t:
                        done[r] = True
                        continue
                    tokens[r, lengths[r]], seg[r, lengths[r]] = nxt[r], 1
                    lengths[r] += 1
                if all(done):
                    break
            outs.extend(new)
            shown.update(len(chunk))
        shown.close()
        return outs
