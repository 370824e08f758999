"""FP8 matmuls for Hopper (`model.matmul_precision=fp8`): operands quantized to float8 around a plain dot_general.

Each operand is scaled by its own absolute maximum (current scaling: the scale of this step's tensor, so
nothing is carried between steps), cast to float8_e4m3fn and cast back; the gradient flowing into the
product is quantized the same way to float8_e5m2, whose wider exponent suits gradients. XLA's GPU GEMM
rewriter folds such a convert-and-scale pair on each side of a dot into one cuBLASLt FP8 GEMM, so the
arithmetic runs at FP8 rate; on other backends the same program computes the rounded values in the compute
dtype, which is what the CPU tests check.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def _qdq(x, fp8_dtype):
    """x rounded to fp8_dtype at a per-tensor scale that maps |x|'s maximum onto the format's maximum."""
    fmax = float(jnp.finfo(fp8_dtype).max)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(x)).astype(jnp.float32))
    scale = jnp.where(amax > 0, amax / fmax, 1.0)
    q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(fp8_dtype)
    # Dequantized as convert-then-multiply in the operand's own dtype: the form the GEMM rewriter matches.
    return q.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def quantize_forward(x):
    """Rounded to e4m3 in the forward pass; the gradient passes straight through (the rounding has none)."""
    return _qdq(x, E4M3)


quantize_forward.defvjp(lambda x: (_qdq(x, E4M3), None), lambda _, g: (g,))


@jax.custom_vjp
def quantize_backward(y):
    """Identity in the forward pass; the gradient arriving here is rounded to e5m2 before the backward GEMMs."""
    return y


quantize_backward.defvjp(lambda y: (y, None), lambda _, g: (_qdq(g, E5M2),))


def dot_general(x, kernel, dimension_numbers):
    """jax.lax.dot_general with both operands, and the gradient of the result, in FP8."""
    y = jax.lax.dot_general(quantize_forward(x), quantize_forward(kernel), dimension_numbers)
    return quantize_backward(y)
