"""A recurrent language model on Flax's own cells: `model.arch=gru` (nn.GRUCell) or `lstm` (nn.OptimizedLSTMCell),
each layer scanned over time by nn.RNN.

It is called like the decoder, `RecurrentLM(c).apply({'params': p}, tokens, positions, segment_ids, cache=,
return_hidden=)`, so the loss, the data, the checkpoints and generation are shared. Each layer is
x + RNN(RMSNorm(x)); the carry restarts at zero where a document starts inside a packed row (position 0 or a
new segment id), so a packed row computes what each of its documents would alone. The cache of generation is
the carry of every layer: a constant size, whatever the length.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kslm_jax.core import config as config_lib
from kslm_jax.model import llama

CELLS = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    matmul_precision: str = "default"  # read by llama.Linear (the untied lm_head); config_checks keeps it default
    fp8_amax_history: int = 1024  # read by llama.Linear too; unused while matmul_precision is default

    @classmethod
    def from_config(cls, cfg) -> "RecurrentConfig":
        m = cfg.model
        return cls(arch=m.arch, vocab_size=config_lib.padded_vocab(cfg), d_model=m.d_model, n_layers=m.n_layers,
                   norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, init_std=m.init_std, dtype=m.dtype,
                   param_dtype=m.param_dtype)


def _cell(c: RecurrentConfig, **kw) -> nn.RNNCellBase:
    # Input and recurrent kernels carry the `embed` name on their input side, so fsdp shards them as it
    # shards the decoder's; their outputs stay whole (a per-step gather inside the time scan would be slow).
    kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
    recurrent = nn.with_logical_partitioning(nn.initializers.orthogonal(), ("embed", None))
    return CELLS[c.arch](c.d_model, kernel_init=kernel, recurrent_kernel_init=recurrent,
                         dtype=llama.DTYPES[c.dtype], param_dtype=llama.DTYPES[c.param_dtype], **kw)


class ResettingCell(nn.RNNCellBase):
    """Flax's cell, its carry zeroed before a step whose input's last feature (the start flag) is 1: nn.RNN
    scans one array, so the flag rides along with the token's features."""
    c: RecurrentConfig

    @nn.compact
    def __call__(self, carry, inputs):
        x, start = inputs[..., :-1], inputs[..., -1:] > 0
        carry = jax.tree.map(lambda h: jnp.where(start, jnp.zeros_like(h), h), carry)
        return _cell(self.c, name=self.c.arch)(carry, x)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return _cell(self.c, parent=None).initialize_carry(rng, (*input_shape[:-1], self.c.d_model))

    @property
    def num_feature_axes(self) -> int:
        return 1


def document_starts(positions, segment_ids):
    """(B, T) True where a document starts: position 0, or a segment id unlike the previous token's."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    changed = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), changed], 1)
    return (positions == 0) | changed


class RecurrentLM(nn.Module):
    c: RecurrentConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False):
        """Logits (B, T, V); with `cache`, (logits, new_cache); with return_hidden, the final normed states."""
        c = self.c
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(c.vocab_size, c.d_model,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                                     ("vocab", "embed")),
                         dtype=llama.DTYPES[c.dtype], param_dtype=llama.DTYPES[c.param_dtype], name="embed_tokens")
        x = nn.with_logical_constraint(embed(tokens), ("batch", "seq", "act_embed"))
        start = document_starts(positions, segment_ids)[..., None].astype(x.dtype)
        carries = cache["carry"] if cache is not None else [init_carry(c, b) for _ in range(c.n_layers)]
        new_carries = []
        for i in range(c.n_layers):
            h = llama.RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=f"norm_{i}")(x)
            # The cell is named, not the nn.RNN around it: its parameters sit at layers_{i}/{gru|lstm}/...
            rnn = nn.RNN(ResettingCell(c, name=f"layers_{i}"), return_carry=True)
            carry, y = rnn(jnp.concatenate([h, start], -1), initial_carry=carries[i])
            new_carries.append(carry)
            x = nn.with_logical_constraint(x + y.astype(x.dtype), ("batch", "seq", "act_embed"))
        x = llama.RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="norm")(x)
        if return_hidden:
            return x
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = llama.Linear((c.vocab_size,), ("embed", "vocab"), c, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab"))
        if cache is None:
            return logits
        return logits, {"carry": new_carries, "index": cache["index"] + t}


def init_carry(c: RecurrentConfig, batch: int):
    """One layer's zero carry: h for a GRU, (c, h) for an LSTM, in the parameter dtype (float32 sums)."""
    shape = (batch, c.d_model)
    zeros = jnp.zeros(shape, llama.DTYPES[c.param_dtype])
    return (zeros, zeros) if c.arch == "lstm" else zeros


def init_cache(c: RecurrentConfig, batch: int) -> dict:
    return {"carry": [init_carry(c, batch) for _ in range(c.n_layers)], "index": jnp.zeros((), jnp.int32)}


def layer_params(c: RecurrentConfig) -> int:
    """Parameters of one layer: input and recurrent kernels of 3 (GRU) or 4 (LSTM) gates, four bias vectors
    (GRU: r, z and both candidate terms; LSTM: one per gate) and the norm's scale."""
    gates = 3 if c.arch == "gru" else 4
    return gates * 2 * c.d_model * c.d_model + 5 * c.d_model


def flops_per_token(c: RecurrentConfig) -> float:
    """Training FLOPs per token: 6 x (parameters outside the input embedding); a recurrence has no
    attention term, its cost per token does not grow with the context."""
    return 6.0 * (c.n_layers * layer_params(c) + c.d_model + c.d_model * c.vocab_size)
