"""Weight-only quantization on the JAX side, to measure quality loss before deployment.

int8: one scale per output channel (symmetric, 127 levels). int4: one scale per group of `group`
input weights of each output channel (symmetric, levels -8..7), the layout of GGUF Q4_0-style formats.
Norm scales stay float. Quantization runs in Hugging Face layout (out, in), through the name table, so
every matrix, the embedding table included, is handled by one rule. The returned parameters are the
dequantized values: the model computes exactly what a weight-only int8/int4 runtime would.
"""
from __future__ import annotations

import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.model import hf_names as hf
from kslm_jax.model.llama import ModelConfig

MODES = ("int8", "int4")


def quantize_matrix(w: np.ndarray, mode: str, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes, float32 scales) for a (out, in) matrix."""
    w = np.asarray(w, np.float32)
    if mode == "int8":
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale
    if mode == "int4":
        out, inp = w.shape
        if inp % group:
            raise KslmError(f"int4 groups of {group} do not divide a matrix of width {inp}")
        g = w.reshape(out, inp // group, group)
        scale = np.abs(g).max(axis=2, keepdims=True) / 7.0
        scale[scale == 0] = 1.0
        return np.clip(np.round(g / scale), -8, 7).astype(np.int8), scale
    raise KslmError(f"quantization {mode!r} is not one of {', '.join(MODES)}")


def dequantize(codes: np.ndarray, scale: np.ndarray, shape) -> np.ndarray:
    return (codes.astype(np.float32) * scale).reshape(shape)


def quantize_params(params, c: ModelConfig, mode: str, group: int = 32) -> tuple[dict, dict]:
    """Dequantized parameters and a size report (bytes as stored: codes + float16 scales + float norms)."""
    tensors = hf.to_hf(params, c)
    stored = float_bytes = 0
    out = {}
    for name, w in tensors.items():
        if w.ndim < 2:
            out[name] = w
            stored += w.size * 4
        else:
            codes, scale = quantize_matrix(w, mode, group)
            out[name] = dequantize(codes, scale, w.shape)
            stored += codes.size * (1 if mode == "int8" else 0.5) + scale.size * 2
        float_bytes += w.size * 4
    return hf.from_hf(out, c, scanned="layers" in params), {"bytes": int(stored), "float32_bytes": int(float_bytes)}
