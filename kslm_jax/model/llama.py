"""A Llama-style decoder in Flax Linen: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.
With `causal=False` the same blocks are the masked-LM encoder (model.arch=encoder): each token sees its whole
document, never another packed beside it.

`logits = Transformer(c).apply({'params': p}, tokens, positions, segment_ids)`; with `cache=` it also returns
the updated KV cache (an explicit input and output, never hidden state). Module names follow Hugging Face
`LlamaForCausalLM` so export/hf.py maps them one to one. Every parameter carries logical axis names;
sharding.py maps those to mesh axes.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kslm_jax.core import config as config_lib
from kslm_jax.model import attention, fp8

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    max_segments: int = 64
    kernels: str = "xla"              # xla | tokamax | tokamax_glu | tokamax_norm (see KERNELS)
    matmul_precision: str = "default"  # default | fp8 | fp8_delayed (model/fp8.py)
    fp8_amax_history: int = 1024      # steps of amax each scale of fp8_delayed is taken from
    scan_unroll: int = 1              # layers per iteration of the scanned stack
    causal: bool = True               # False: the masked-LM encoder (model.arch=encoder), whole documents

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        m = cfg.model
        return cls(vocab_size=config_lib.padded_vocab(cfg), d_model=m.d_model, n_layers=m.n_layers,
                   n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=config_lib.head_dim(cfg),
                   d_ff=config_lib.d_ff(cfg), rope_theta=m.rope_theta, norm_eps=m.norm_eps,
                   tie_embeddings=m.tie_embeddings, init_std=m.init_std, dtype=m.dtype,
                   param_dtype=m.param_dtype, attention=m.attention, scan_layers=m.scan_layers, remat=m.remat,
                   max_segments=cfg.data.max_segments_per_row, kernels=m.kernels,
                   matmul_precision=m.matmul_precision, fp8_amax_history=m.fp8_amax_history,
                   scan_unroll=m.scan_unroll, causal=m.arch != "encoder")


# Which tokamax kernels `kernels` turns on: the fused SwiGLU (gate and up projections in one kernel) and RMSNorm.
KERNELS = {"xla": (), "tokamax": ("glu", "norm"), "tokamax_glu": ("glu",), "tokamax_norm": ("norm",)}


def _tokamax_impl():
    # tokamax picks its fastest kernel on a GPU; elsewhere its XLA reference, which the CPU tests compare.
    return None if jax.default_backend() == "gpu" else "xla"


def _init(c: ModelConfig, names, std=None):
    return nn.with_logical_partitioning(nn.initializers.normal(std or c.init_std), names)


def rope(x, positions, theta: float):
    """Rotary embedding in the Hugging Face layout (halves rotated, not interleaved pairs)."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles = positions[..., None].astype(jnp.float32) * inv_freq           # (B, T, H/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]    # (B, T, 1, H)
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., h // 2:], xf[..., : h // 2]], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class Linear(nn.Module):
    """x @ kernel over the last `n_in` axes of x; the kernel keeps its full N-d shape and logical names."""
    features: tuple
    names: tuple
    c: ModelConfig
    n_in: int = 1
    fp8_allowed: bool = True  # False keeps this projection in the compute dtype under matmul_precision=fp8*

    @nn.compact
    def __call__(self, x):
        shape = (*x.shape[x.ndim - self.n_in:], *self.features)
        kernel = self.param("kernel", _init(self.c, self.names), shape, DTYPES[self.c.param_dtype])
        dtype = DTYPES[self.c.dtype]
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        precision = self.c.matmul_precision if self.fp8_allowed else "default"
        dot = fp8.linear_dot(self, precision, self.c.fp8_amax_history)
        return dot(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))


class Kernel(nn.Module):
    """A Linear's kernel alone (same name, shape and init), for kernels that take the weights themselves."""
    shape: tuple
    names: tuple
    c: ModelConfig

    @nn.compact
    def __call__(self):
        return self.param("kernel", _init(self.c, self.names), self.shape, DTYPES[self.c.param_dtype])


class RMSNorm(nn.Module):
    eps: float
    dtype: str
    param_dtype: str
    fused: bool = False  # tokamax's layer_norm in RMS mode instead of the XLA expression below

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), DTYPES[self.param_dtype])
        if self.fused:
            tokamax = attention.load_tokamax()
            y = tokamax.layer_norm(x, scale.astype(jnp.float32), None, epsilon=self.eps, subtract_mean=False,
                                   implementation=_tokamax_impl())
            return y.astype(DTYPES[self.dtype])
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale.astype(jnp.float32)).astype(DTYPES[self.dtype])


class Attention(nn.Module):
    c: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions, attn_inputs, layer_cache, cache_index):
        c = self.c
        q = Linear((c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), c, name="q_proj")(x_BTD)
        k = Linear((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c, name="k_proj")(x_BTD)
        v = Linear((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c, name="v_proj")(x_BTD)
        q = nn.with_logical_constraint(rope(q, positions, c.rope_theta), ("batch", "seq", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(rope(k, positions, c.rope_theta), ("batch", "seq", "act_kv_heads", "head_dim"))
        new_cache = None
        if layer_cache is None:
            out = attention.attend(q, k, v, attn_inputs, c.attention, c.causal)
        else:
            kc = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, cache_index, 0, 0))
            vc = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": kc, "v": vc}
            out = attention.reference(q, kc.astype(q.dtype), vc.astype(q.dtype), attn_inputs["mask"])
        out = nn.with_logical_constraint(out, ("batch", "seq", "act_heads", "head_dim"))
        y = Linear((c.d_model,), ("heads", "head_dim", "embed"), c, n_in=2, name="o_proj")(out)
        return y, new_cache


class MLP(nn.Module):
    c: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.c
        if "glu" in KERNELS[c.kernels]:
            tokamax = attention.load_tokamax()
            dtype = DTYPES[c.dtype]
            w = [Kernel((x_BTD.shape[-1], c.d_ff), ("embed", "mlp"), c, name=n)().astype(dtype)
                 for n in ("gate_proj", "up_proj")]
            h = tokamax.gated_linear_unit(x_BTD.astype(dtype), tuple(w), activation=jax.nn.silu,
                                          implementation=_tokamax_impl())
        else:
            gate = Linear((c.d_ff,), ("embed", "mlp"), c, name="gate_proj")(x_BTD)
            up = Linear((c.d_ff,), ("embed", "mlp"), c, name="up_proj")(x_BTD)
            h = nn.silu(gate) * up
        h = nn.with_logical_constraint(h, ("batch", "seq", "act_mlp"))
        return Linear((c.d_model,), ("mlp", "embed"), c, name="down_proj")(h)


class Block(nn.Module):
    c: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions, attn_inputs, layer_cache, cache_index):
        c = self.c
        fused = "norm" in KERNELS[c.kernels]
        h, new_cache = Attention(c, name="self_attn")(
            RMSNorm(c.norm_eps, c.dtype, c.param_dtype, fused, name="input_layernorm")(x_BTD),
            positions, attn_inputs, layer_cache, cache_index)
        x_BTD = x_BTD + h
        x_BTD = x_BTD + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.dtype, c.param_dtype, fused,
                                                   name="post_attention_layernorm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
        return x_BTD, new_cache


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    c: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False):
        """Logits (B, T, V); with `cache`, (logits, new_cache); with return_hidden, the final normed states."""
        c = self.c
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=_init(c, ("vocab", "embed")),
                         dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype], name="embed_tokens")
        x = nn.with_logical_constraint(embed(tokens), ("batch", "seq", "act_embed"))
        cache_index = None if cache is None else cache["index"]
        layers = {"k": cache["k"], "v": cache["v"]} if cache is not None else None
        # What the attention kernel needs (mask or segment layout), built once outside the layer scan.
        if cache is None:
            attn_inputs = attention.prepare(c.attention, positions, segment_ids, c.max_segments, c.causal)
        else:
            s = cache["k"].shape[2]
            k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            # Rows of a batch may start at different slots (left-padded prompts, eval/serve batching): row b's
            # slot s holds position s - offset[b]; slots before the offset are padding nobody attends to.
            off = cache.get("offset", jnp.zeros((b,), jnp.int32))[:, None, None]
            k_slot = k_pos[:, None, :]
            attn_inputs = {"mask": (k_slot <= positions[:, :, None] + off) & (k_slot >= off)}  # unwritten: ahead

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            # The FP8 scales and histories (fp8_delayed) are per layer, like the weights.
            stack = nn.scan(block, variable_axes={"params": 0, fp8.META: 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.n_layers,
                            unroll=c.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_layers = stack(c, name="layers")(x, positions, attn_inputs, layers, cache_index)
        else:
            outs = []
            for i in range(c.n_layers):
                layer = None if layers is None else jax.tree.map(lambda a: a[i], layers)
                x, new = block(c, name=f"layers_{i}")(x, positions, attn_inputs, layer, cache_index)
                outs.append(new)
            new_layers = None if layers is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        x = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, "norm" in KERNELS[c.kernels], name="norm")(x)
        if return_hidden:
            return x
        # Logits stay in the compute dtype: float32 out of the matmul would make its backward GEMMs float32
        # too (measured: 8 ms instead of 3 per step at 124M on an H100); the loss upcasts instead.
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            # Not in FP8: e4m3's rounding here lands on every logit, and the loss sees it directly (the tied
            # embedding's attend never used FP8 either).
            logits = Linear((c.vocab_size,), ("embed", "vocab"), c, name="lm_head", fp8_allowed=False)(x)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab"))
        if cache is None:
            return logits
        new_cache = {"k": new_layers["k"], "v": new_layers["v"], "index": cache["index"] + t}
        if "offset" in cache:
            new_cache["offset"] = cache["offset"]
        return logits, new_cache


def output_kernel(params, c: ModelConfig):
    """The (D, V) matrix that turns final states into logits: lm_head, or the embedding when tied."""
    return params["embed_tokens"]["embedding"].T if c.tie_embeddings else params["lm_head"]["kernel"]


def init_cache(c: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and their weighted sum (PaLM appendix B)."""
    return 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters outside the input embedding) + attention (PaLM appendix B)."""
    attn = c.n_heads * c.head_dim
    per_layer = c.d_model * (attn + 2 * c.n_kv_heads * c.head_dim) + attn * c.d_model + 3 * c.d_model * c.d_ff + 2 * c.d_model
    n = c.n_layers * per_layer + c.d_model + c.d_model * c.vocab_size
    return 6.0 * n + attention_flops_per_token(c, seq_len)
