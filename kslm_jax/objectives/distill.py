"""Teacher-student losses on (B, T, V) logits, in float32, masked exactly like the LM loss.

Conventions (p_t teacher, p_s student, both softmax(logits / temperature)):
- forward_kl  KL(p_t || p_s) = sum p_t (log p_t - log p_s): mass-covering, the Hinton et al. choice.
- reverse_kl  KL(p_s || p_t): mode-seeking.
- jsd         generalized Jensen-Shannon with m = beta p_t + (1 - beta) p_s:
              beta KL(p_t || m) + (1 - beta) KL(p_s || m); beta = 0.5 is the symmetric JSD (GKD, Agarwal et al.).
- skew_kl     alpha-skew forward KL(p_t || beta p_t + (1 - beta) p_s), alpha = beta (DistiLLM, Ko et al.);
              beta = 0 is forward KL, a larger beta bounds the loss where the student gives a token little mass.
Every divergence is multiplied by temperature**2, so its gradients keep their scale as the temperature
changes (Hinton et al.). The objective is alpha * KD + (1 - alpha) * CE, CE against the data at temperature 1.

Top-k (online or from the offline cache): the teacher keeps its k most likely tokens; both distributions are
renormalized over those k tokens before the divergence, so every divergence stays a divergence between two
proper distributions and any temperature can be applied to stored temperature-1 log-probabilities. Student
mass outside the teacher's top-k is left to the CE term.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


def _kl(logp, logq):
    """KL(p || q) over the last axis from finite log-probabilities (log_softmax never returns -inf)."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _log_mix(logp_t, logp_s, beta: float):
    """log(beta p_t + (1 - beta) p_s), stable for beta in [0, 1]."""
    lb = jnp.log(jnp.float32(beta)) if beta > 0 else -jnp.inf
    l1b = jnp.log(jnp.float32(1.0 - beta)) if beta < 1 else -jnp.inf
    return jnp.logaddexp(lb + logp_t, l1b + logp_s)


def divergence(logp_t, logp_s, kind: str, beta: float = 0.5):
    """Per-position divergence (..., V) -> (...) between normalized log-probabilities."""
    if kind == "forward_kl":
        return _kl(logp_t, logp_s)
    if kind == "reverse_kl":
        return _kl(logp_s, logp_t)
    if kind == "jsd":
        m = _log_mix(logp_t, logp_s, beta)
        return beta * _kl(logp_t, m) + (1.0 - beta) * _kl(logp_s, m)
    if kind == "skew_kl":
        return _kl(logp_t, _log_mix(logp_t, logp_s, beta))
    raise ValueError(f"unknown distillation loss {kind!r}; one of {', '.join(LOSSES)}")


def kd_full(student_logits, teacher_logits, mask, kind: str, beta: float = 0.5, temperature: float = 1.0):
    """Per-token KD loss (B, T) over the whole vocabulary, zero where mask is False."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    logp_t = jax.nn.log_softmax(t / temperature, axis=-1)
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    d = divergence(logp_t, logp_s, kind, beta) * temperature ** 2
    return jnp.where(mask, d, 0.0)


def teacher_topk(teacher_logits, k: int):
    """The teacher's k most likely tokens: temperature-1 log-probabilities (descending) and int32 ids."""
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logp, k)
    return values, ids.astype(jnp.int32)


def kd_topk(student_logits, topk_logp, topk_ids, mask, kind: str, beta: float = 0.5, temperature: float = 1.0):
    """Per-token KD loss (B, T) over the teacher's top-k tokens, both sides renormalized over them."""
    s = jnp.take_along_axis(student_logits.astype(jnp.float32), topk_ids, axis=-1)
    logp_s = jax.nn.log_softmax(s / temperature, axis=-1)
    t = jax.lax.stop_gradient(topk_logp.astype(jnp.float32))
    logp_t = jax.nn.log_softmax(t / temperature, axis=-1)
    d = divergence(logp_t, logp_s, kind, beta) * temperature ** 2
    return jnp.where(mask, d, 0.0)


def top1_agreement(student_logits, teacher_top1, mask):
    """1 where the student's most likely token is the teacher's, per masked position (float32)."""
    same = jnp.argmax(student_logits, axis=-1).astype(jnp.int32) == teacher_top1
    return jnp.where(mask & same, 1.0, 0.0)


def mixed(ce_sum, kd_sum, z_sum, alpha: float):
    """The objective summed over the batch: alpha * KD + (1 - alpha) * CE, plus the z-loss; the train step
    divides it by the count of tokens in the whole global batch."""
    return alpha * kd_sum + (1.0 - alpha) * ce_sum + z_sum
