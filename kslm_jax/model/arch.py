"""Which model a config names (`model.arch`): the decoder (model/llama.py), the masked-LM encoder (the same
Llama blocks with `causal=False`) or a recurrent LM (model/recurrent.py).

The trainer, evaluation and generation build their model here and call it the same way; the commands that
read the decoder's own layout (export, pruning, serving, `--quant`, `kslm compile` and `kslm inspect`) ask
`require_decoder` first (HF export also takes the encoder: `require_blocks`), and generation asks
`require_causal`; the fine-tuning an architecture cannot do is refused by the config check
(core/config_checks.py).
"""
from __future__ import annotations

import jax.numpy as jnp

from kslm_jax.core.errors import KslmError
from kslm_jax.model import llama, recurrent

RECURRENT = tuple(recurrent.CELLS)


def model_config(cfg):
    if cfg.model.arch in RECURRENT:
        return recurrent.RecurrentConfig.from_config(cfg)
    return llama.ModelConfig.from_config(cfg)


def build(c):
    return recurrent.RecurrentLM(c) if isinstance(c, recurrent.RecurrentConfig) else llama.Transformer(c)


def from_config(cfg):
    """(model config, Flax module) of `cfg`."""
    c = model_config(cfg)
    return c, build(c)


def init_cache(c, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """The decoder's KV cache of max_len slots, or the recurrent carry (its size does not depend on max_len)."""
    if isinstance(c, recurrent.RecurrentConfig):
        return recurrent.init_cache(c, batch)
    return llama.init_cache(c, batch, max_len, dtype)


def flops_per_token(c, seq_len: int) -> float:
    if isinstance(c, recurrent.RecurrentConfig):
        return recurrent.flops_per_token(c)
    return llama.flops_per_token(c, seq_len)


SUPPORTS = {"encoder": "kslm train, eval (held-out masked-LM, --tasks korsts and cls), cls fine-tuning and "
                       "export --format hf",
            "gru": "kslm train, eval (held-out and --tasks) and generate",
            "lstm": "kslm train, eval (held-out and --tasks) and generate"}


def require_decoder(cfg, what: str) -> None:
    if cfg.model.arch != "decoder":
        raise KslmError(f"{what} needs the decoder, and this run has model.arch={cfg.model.arch}; it supports "
                        f"{SUPPORTS[cfg.model.arch]}")


def require_blocks(cfg, what: str) -> None:
    """The Llama blocks, causal or not (the decoder or the encoder): what the HF name table maps."""
    if cfg.model.arch in RECURRENT:
        require_decoder(cfg, what)


def require_causal(cfg, what: str) -> None:
    """Generation and next-token scoring: an encoder sees the tokens after each position, so it predicts none."""
    if cfg.model.arch == "encoder":
        raise KslmError(f"{what} needs a causal model, and this run has model.arch=encoder (bidirectional: it "
                        f"fills masked tokens, it does not continue text); it supports {SUPPORTS['encoder']}")
