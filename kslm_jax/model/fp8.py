"""FP8 matmuls for Hopper (`model.matmul_precision=fp8`): the GEMMs of a projection take float8 operands.

Forward: x and the kernel are each scaled by their own absolute maximum (current scaling: this step's
tensor sets its scale, so nothing is carried between steps) and cast to float8_e4m3fn; the product of the
float8 arrays accumulates in float32 and is multiplied by the two scales. Backward: the incoming gradient is
cast the same way to float8_e5m2 (wider exponent, for gradients), and both backward GEMMs multiply it by the
saved float8 operands. The rounding has no gradient of its own (straight through).

The float8 arrays go into dot_general as they are, not as a quantize-dequantize pair around a compute-dtype
dot: measured on an H100 (jax 0.11.2), XLA dropped such a pair inside a jitted model (logits equal to the
default path's within 2e-7), so the model never saw FP8. A float8 dot_general is what XLA's GPU backend hands
to cuBLASLt's FP8 GEMM; other backends compute the same rounded product in float32, which the CPU tests check.

Delayed scaling (`model.matmul_precision=fp8_delayed`) is Flax's Fp8DirectDotGeneralOp (flax.linen.fp8_ops):
each operand's scale comes from the largest amax in a history of the last `model.fp8_amax_history` steps, so
no reduction over this step's tensor has to finish before it is cast. The scales and histories are variables
of the collection META; the backward pass returns their updated values as their "gradients", which the train
step writes back over them (train/step.py). A model applied without that collection (eval, sampling, export
pass only the params) falls back to the current scaling above: it needs no history and sees the same formats.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
META = fp8_ops.OVERWRITE_WITH_GRADIENT


def quantize(x, fp8_dtype):
    """(x / scale rounded to fp8_dtype, scale): the scale maps |x|'s maximum onto the format's maximum."""
    fmax = float(jnp.finfo(fp8_dtype).max)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / fmax, 1.0)
    return jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(fp8_dtype), scale


def _dot(a, b, contract):
    """a . b over one axis of each, in float32, whatever the two float8 dtypes."""
    return jax.lax.dot_general(a, b, ((contract[0], contract[1]), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(x, w):
    """(M, K) @ (K, N) with both operands in e4m3, the result (and both gradients) in x's dtype, which w shares
    (a Linear casts both to the compute dtype)."""
    return _fwd(x, w)[0]


def _fwd(x, w):
    xq, sx = quantize(x, E4M3)
    wq, sw = quantize(w, E4M3)
    y = (_dot(xq, wq, ((1,), (0,))) * (sx * sw)).astype(x.dtype)
    return y, (xq, sx, wq, sw)


def _bwd(res, g):
    xq, sx, wq, sw = res
    gq, sg = quantize(g, E5M2)
    dx = (_dot(gq, wq, ((1,), (1,))) * (sg * sw)).astype(g.dtype)   # g @ w.T
    dw = (_dot(xq, gq, ((0,), (0,))) * (sx * sg)).astype(g.dtype)   # x.T @ g
    return dx, dw


matmul.defvjp(_fwd, _bwd)


def dot_general(x, kernel, dimension_numbers):
    """jax.lax.dot_general for a Linear (x's last n axes against the kernel's first n, no batch axes) in FP8."""
    (x_axes, k_axes), batch = dimension_numbers
    n = len(x_axes)
    if batch != ((), ()) or tuple(x_axes) != tuple(range(x.ndim - n, x.ndim)) or tuple(k_axes) != tuple(range(n)):
        raise ValueError(f"fp8.dot_general takes a Linear's contraction only, not {dimension_numbers}")
    lead, k_in, out = x.shape[:x.ndim - n], math.prod(x.shape[x.ndim - n:]), kernel.shape[n:]
    y = matmul(x.reshape(-1, k_in), kernel.reshape(k_in, -1))
    return y.reshape(*lead, *out)


def linear_dot(module: nn.Module, precision: str, history: int):
    """The dot_general of a Linear `module` (called inside its compact __call__) under `precision`.

    Flax's op as a child named "fp8" keeps its six variables (scale and amax history of the input, the kernel
    and the output gradient) under the Linear, so the scanned stack stacks them per layer like the kernel."""
    if precision == "fp8_delayed" and (module.is_initializing() or module.has_variable(META, "fp8")):
        return fp8_ops.Fp8DirectDotGeneralOp(amax_history_length=history, name="fp8")
    return dot_general if precision in ("fp8", "fp8_delayed") else jax.lax.dot_general
