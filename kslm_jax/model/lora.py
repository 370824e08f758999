"""Low-rank adapters (LoRA) on the decoder's projections, and an int8 frozen base, without changing the model.

The frozen base and the adapters are separate trees (the optimizer and the checkpoint see only the adapters).
`combine` puts each module's `lora_a` (in, r) and `lora_b` (r, out) next to its kernel, and the Flax method
interceptor from `intercept` makes every such Linear return  x W + (alpha/r) * dropout(x) A B.  Under the
layer scan the stacked adapter arrays are sliced per layer exactly like the kernels. An int8 base stores each
projection as `kernel_int8` codes and one float scale per output channel (model/quantize.py's rule); the
interceptor dequantizes it one layer at a time, inside the scan, so a float copy of the base never exists.
`merge` folds the adapters into the kernels: the merged model computes what base + adapters computed.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.model import llama, quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_N_IN = {"o_proj": 2}  # o_proj contracts (heads, head_dim); every other projection one axis


def _geometry(path: tuple, shape: tuple) -> tuple[int, int, int]:
    """(leading layer axes, flattened input width, flattened output width) of a projection kernel."""
    lead = 1 if path[0] == "layers" else 0  # scanned layers stack their kernels on a leading axis
    n_in = _N_IN.get(path[-1], 1)
    return lead, math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])


def module_paths(params, targets) -> list[tuple]:
    """Paths of the modules named in `targets`; a target that matches none is an error naming the key."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if path and path[-1] in targets and ("kernel" in node or "kernel_int8" in node):
                found.append(path)
            for k, v in node.items():
                walk(v, path + (k,))
    walk(params, ())
    for t in targets:
        if not any(p[-1] == t for p in found):
            raise KslmError(f"config key lora.targets: {t!r} matches no module of the model")
    return found


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _kernel_shape(node) -> tuple:
    return tuple(node["kernel"].shape if "kernel" in node else node["kernel_int8"].shape)


def init(rng, base, targets, rank: int) -> dict:
    """Adapters for every targeted module of `base` (arrays or shapes): A ~ N(0, 1/in), B = 0, so training
    starts from exactly the base model."""
    out: dict = {}
    for i, path in enumerate(module_paths(base, targets)):
        shape = _kernel_shape(_get(base, path))
        lead, d_in, d_out = _geometry(path, shape)
        a = jax.random.normal(jax.random.fold_in(rng, i), (*shape[:lead], d_in, rank), jnp.float32) / math.sqrt(d_in)
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node.update(lora_a=a, lora_b=jnp.zeros((*shape[:lead], rank, d_out), jnp.float32))
    return out


def combine(base, adapters):
    """The base tree with each adapted module's lora_a/lora_b added beside its kernel (no copies of arrays)."""
    if not isinstance(adapters, dict):
        return adapters
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(base[k], v) if k in base and isinstance(base[k], dict) else v
    return out


def intercept(scale: float, dropout: float = 0.0):
    """A Flax method interceptor adding the adapters (and dequantizing int8 kernels) in every Linear.

    Dropout on the adapters' input needs a "dropout" rng in `apply(..., rngs=...)`; each Linear draws its own
    key from it (Flax folds in the module path, and the layer scan splits it per layer).
    """
    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, llama.Linear):
            return next_fun(*args, **kwargs)
        quantized = m.has_variable("params", "kernel_int8")
        adapted = m.has_variable("params", "lora_a")
        if not (quantized or adapted):
            return next_fun(*args, **kwargs)
        x = args[0]
        dtype = llama.DTYPES[m.c.dtype]
        y = _int8_linear(m, x, dtype) if quantized else next_fun(*args, **kwargs)
        if not adapted:
            return y
        a, b = m.get_variable("params", "lora_a"), m.get_variable("params", "lora_b")
        h = x.reshape(*x.shape[:x.ndim - m.n_in], -1).astype(dtype)
        if dropout > 0 and m.has_rng("dropout"):
            keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0).astype(dtype)
        delta = (h @ a.astype(dtype)) @ b.astype(dtype)
        return y + (scale * delta).reshape(y.shape).astype(y.dtype)
    return nn.intercept_methods(interceptor)


def _int8_linear(m, x, dtype):
    codes = m.get_variable("params", "kernel_int8")
    scale = m.get_variable("params", "kernel_scale")
    out_shape = codes.shape[m.n_in:]
    kernel = codes.astype(dtype) * scale.reshape(out_shape).astype(dtype)
    contract = (tuple(range(x.ndim - m.n_in, x.ndim)), tuple(range(m.n_in)))
    return jax.lax.dot_general(x.astype(dtype), kernel, (contract, ((), ())))


def quantize_base(params) -> dict:
    """Host parameters with every layer projection stored as int8 codes + float32 per-output-channel scales."""

    def visit(node, path):
        if not isinstance(node, dict):
            return node
        if path and path[-1] in PROJECTIONS and "kernel" in node:
            w = np.asarray(node["kernel"], np.float32)
            lead, d_in, d_out = _geometry(path, w.shape)
            codes, scales = [], []
            for wl in w.reshape(-1, d_in, d_out):
                c, s = quantize.quantize_matrix(wl.T, "int8")  # its layout is (out, in), one scale per row
                codes.append(c.T)
                scales.append(s[:, 0])
            return {"kernel_int8": np.stack(codes).reshape(w.shape),
                    "kernel_scale": np.stack(scales).reshape(*w.shape[:lead], d_out).astype(np.float32)}
        return {k: visit(v, path + (k,)) for k, v in node.items()}
    return visit(params, ())


def dequantize(params):
    """Float kernels from int8 ones (identity elsewhere): the weights an int8-base run actually used."""
    def visit(node, path):
        if not isinstance(node, dict):
            return node
        if "kernel_int8" in node:
            codes = node["kernel_int8"]
            lead, n_in = (1 if path[0] == "layers" else 0), _N_IN.get(path[-1], 1)
            scale = node["kernel_scale"].reshape(*codes.shape[:lead], *([1] * n_in), *codes.shape[lead + n_in:])
            return {"kernel": codes.astype(jnp.float32) * scale}
        return {k: visit(v, path + (k,)) for k, v in node.items()}
    return visit(params, ())


def merge(base, adapters, scale: float):
    """Plain parameters: each adapted kernel becomes W + scale * A B (int8 kernels dequantized first)."""
    merged = dequantize(base)

    def visit(node, ad, path):
        if "lora_a" in ad:
            w = node["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", ad["lora_a"], ad["lora_b"]).reshape(w.shape)
            return dict(node, kernel=(w + scale * delta).astype(w.dtype))
        return {k: visit(node[k], ad[k], path + (k,)) if k in ad else v for k, v in node.items()}
    return visit(merged, adapters, ())


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
