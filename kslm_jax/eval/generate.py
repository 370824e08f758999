"""Decoding with an explicit cache (the decoder's keys and values, or a recurrent model's carry): temperature,
top-k and top-p sampling, or greedy at temperature 0."""
from __future__ import annotations

import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.data import prepare
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import arch, llama


@functools.partial(jax.jit, static_argnames=("model",))
def forward_cached(model, params, tokens, positions, cache):
    return model.apply({"params": params}, tokens, positions, None, cache)


@functools.partial(jax.jit, static_argnames=("top_k", "vocab_limit"))
def sample(logits, rng, temperature, top_p, *, top_k: int, vocab_limit: int):
    """One token per row from logits (B, V); ids at or past vocab_limit (padding of the logits) never win."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(drop_sorted)
    scaled = jnp.where(drop, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled)


def cache_len(needed: int) -> int:
    return -(-needed // 128) * 128


PREFILL_CHUNK = 16


def prefill(model, params, prompt_ids: list[int], cache):
    """The prompt through the cache in chunks of PREFILL_CHUNK tokens, the rest one token at a time: two program
    shapes for every prompt length (the second is the decoding step's), where feeding the whole prompt compiles
    a new program for each length. `kslm demo`'s three prompts compiled three prefills."""
    ids = np.asarray([prompt_ids], np.int32)  # numpy: a jnp slice at each new offset would compile its own op
    done, n = 0, len(prompt_ids)
    while done < n:
        width = PREFILL_CHUNK if n - done >= PREFILL_CHUNK else 1
        positions = np.arange(done, done + width, dtype=np.int32)[None]
        logits, cache = forward_cached(model, params, ids[:, done:done + width], positions, cache)
        done += width
    return logits, cache


def generate_ids(model: llama.Transformer, params, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, rng, vocab_limit: int, stop_id: int | None = tok_lib.EOS) -> list[int]:
    c = model.c
    cache = arch.init_cache(c, 1, cache_len(len(prompt_ids) + max_new_tokens), jnp.float32)
    logits, cache = prefill(model, params, prompt_ids, cache)
    out: list[int] = []
    pos = len(prompt_ids)
    for i in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        nxt = int(sample(logits[:, -1], key, temperature, top_p, top_k=top_k, vocab_limit=vocab_limit)[0])
        if stop_id is not None and nxt == stop_id:
            break
        out.append(nxt)
        if i + 1 == max_new_tokens:
            break
        logits, cache = forward_cached(model, params, jnp.asarray([[nxt]], jnp.int32),
                                       jnp.asarray([[pos]], jnp.int32), cache)
        pos += 1
    return out


def generate_text(model, params, sp, prompt: str, gcfg, rng=None) -> str:
    rng = jax.random.PRNGKey(gcfg.seed) if rng is None else rng
    ids = [tok_lib.BOS] + sp.EncodeAsIds(prompt)
    new = generate_ids(model, params, ids, max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                       top_k=gcfg.top_k, top_p=gcfg.top_p, rng=rng, vocab_limit=sp.GetPieceSize())
    return sp.DecodeIds(ids[1:] + new)


def held_out_prompts(clean_dir: Path, n: int, words: int = 3) -> list[str]:
    """The first eojeols of `n` held-out documents (data/clean/val-*, else train-*), spread over the first
    thousand: prompts in the domain the model was trained on, whatever that domain is."""
    for split in ("val", "train"):
        docs = [d for d in itertools.islice(prepare.read_clean(clean_dir, split, required=False), 1000)
                if len(d.split()) > 1]
        if docs:
            picks = [docs[i * len(docs) // n] for i in range(min(n, len(docs)))]
            return [" ".join(d.split()[:max(1, min(words, len(d.split()) // 2))]) for d in picks]
    raise KslmError(f"no prepared text in {clean_dir} to take prompts from; pass --prompt TEXT")


def apply_sampling_flags(gcfg, max_new_tokens=None, temperature=None, top_p=None, seed=None) -> None:
    """`kslm generate --max-new-tokens/--temperature/--top-p/--seed` over generate.* for this call only."""
    checks = (("max_new_tokens", max_new_tokens, lambda v: v >= 1, "--max-new-tokens must be 1 or more"),
              ("temperature", temperature, lambda v: v >= 0, "--temperature must be 0 (greedy) or more"),
              ("top_p", top_p, lambda v: 0 < v <= 1, "--top-p must be in (0, 1]"),
              ("seed", seed, lambda v: True, ""))
    with gcfg.unlocked():
        for key, value, ok, message in checks:
            if value is None:
                continue
            if not ok(value):
                raise KslmError(f"{message}, not {value}")
            gcfg[key] = type(gcfg[key])(value)
