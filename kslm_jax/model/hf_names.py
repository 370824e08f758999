"""The name table between our parameter tree and Hugging Face `LlamaForCausalLM` tensors, both ways.

HF stores Linear weights as (out, in); our kernels are (in, out) with attention heads kept as their own axis,
and scanned layers stacked on a leading axis. RoPE uses the same half-rotation layout, so no permutation.
"""
from __future__ import annotations

import numpy as np

from kslm_jax.model.llama import ModelConfig

_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


def _layers(params, c: ModelConfig):
    if "layers" in params:
        return [{k: _index(v, i) for k, v in params["layers"].items()} for i in range(c.n_layers)]
    return [params[f"layers_{i}"] for i in range(c.n_layers)]


def _index(tree, i):
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)[i]


def to_hf(params, c: ModelConfig) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
           "model.norm.weight": np.asarray(params["norm"]["scale"])}
    if not c.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    for i, layer in enumerate(_layers(params, c)):
        pre = f"model.layers.{i}."
        attn, mlp = layer["self_attn"], layer["mlp"]
        for name in _ATTN:
            k = np.asarray(attn[name]["kernel"])                       # (D, heads, head_dim)
            out[f"{pre}self_attn.{name}.weight"] = k.reshape(k.shape[0], -1).T
        o = np.asarray(attn["o_proj"]["kernel"])                       # (heads, head_dim, D)
        out[f"{pre}self_attn.o_proj.weight"] = o.reshape(-1, o.shape[-1]).T
        for name in (*_MLP_IN, "down_proj"):
            out[f"{pre}mlp.{name}.weight"] = np.asarray(mlp[name]["kernel"]).T
        out[f"{pre}input_layernorm.weight"] = np.asarray(layer["input_layernorm"]["scale"])
        out[f"{pre}post_attention_layernorm.weight"] = np.asarray(layer["post_attention_layernorm"]["scale"])
    return out


def from_hf(tensors: dict[str, np.ndarray], c: ModelConfig, scanned: bool = True) -> dict:
    """HF tensors → our parameter tree (stacked under `layers` when scanned)."""
    def get(name):
        if name not in tensors:
            raise KeyError(f"tensor {name} missing from the checkpoint")
        return np.asarray(tensors[name])

    layers = []
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        attn = {}
        for name, heads in zip(_ATTN, (c.n_heads, c.n_kv_heads, c.n_kv_heads)):
            attn[name] = {"kernel": get(f"{pre}self_attn.{name}.weight").T.reshape(c.d_model, heads, c.head_dim)}
        attn["o_proj"] = {"kernel": get(f"{pre}self_attn.o_proj.weight").T.reshape(c.n_heads, c.head_dim, c.d_model)}
        mlp = {name: {"kernel": get(f"{pre}mlp.{name}.weight").T} for name in (*_MLP_IN, "down_proj")}
        layers.append({"self_attn": attn, "mlp": mlp,
                       "input_layernorm": {"scale": get(f"{pre}input_layernorm.weight")},
                       "post_attention_layernorm": {"scale": get(f"{pre}post_attention_layernorm.weight")}})
    params = {"embed_tokens": {"embedding": get("model.embed_tokens.weight")},
              "norm": {"scale": get("model.norm.weight")}}
    if not c.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    if scanned:
        params["layers"] = _stack(layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return params


def _stack(trees):
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)
