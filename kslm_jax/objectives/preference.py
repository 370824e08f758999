"""Preference losses on packed pairs (data/preference_data.py): DPO and IPO against a frozen reference.

For a pair (x, y_w, y_l), with log pi(y | x) summed over the response tokens only (the template's prompt and
markers before the response carry no loss), the implicit reward of a response is
    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))
and the margin h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), so r(y_w) - r(y_l) = beta h.
- dpo (Rafailov et al. 2023):  -log sigmoid(beta h). Its gradient is beta * sigmoid(-beta h) * grad h: it
  vanishes as beta -> 0, and on pairs it already ranks right it fades only slowly, so with preferences that
  are always the same way round (every NSMC pair: positive over negative) it keeps pushing h up.
- ipo (Azar et al. 2023):  (h - 1/(2 beta))^2. A squared loss toward a finite margin 1/(2 beta): once a
  pair's margin reaches it the pull stops, so the policy stays near the reference however certain the
  preferences are; that is the failure of DPO on deterministic preferences IPO was derived to fix, and it
  needs the same two forward passes (no reference-free variant would keep the reference this run holds).
Both sum over the pairs of a micro-batch and report the pair count as aux["tokens"]: the step divides the
summed gradients of all micro-batches by the pairs of the whole global batch, so accumulation is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kslm_jax.train import step as step_lib

LOSSES = ("dpo", "ipo")


def per_pair(token_values, mask, segment_ids, pairs: int):
    """(chosen, rejected) sums of token_values over the masked positions of each pair, (rows, pairs) each,
    and whether the row holds pair k; chosen is segment 2k+1, rejected 2k+2."""
    rows = segment_ids.shape[0]
    slots = 2 * pairs + 1
    idx = (jnp.arange(rows, dtype=jnp.int32)[:, None] * slots + segment_ids).reshape(-1)

    def sums(v):
        return jax.ops.segment_sum(v.reshape(-1), idx, num_segments=rows * slots).reshape(rows, slots)[:, 1:]
    s = sums(jnp.where(mask, token_values, 0.0))
    present = sums((segment_ids > 0).astype(jnp.float32)) > 0
    return s[:, 0::2], s[:, 1::2], present[:, 0::2] & present[:, 1::2]


def pair_losses(pi_c, pi_r, ref_c, ref_r, beta: float, kind: str):
    """Per-pair loss from summed response log-probs of the policy (pi_*) and the reference (ref_*)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "dpo":
        return -jax.nn.log_sigmoid(beta * h)
    if kind == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    raise ValueError(f"unknown preference loss {kind!r}; one of {', '.join(LOSSES)}")


def summed(pi_c, pi_r, ref_c, ref_r, valid, beta: float, kind: str):
    """(summed loss, aux) over the valid pairs: loss, reward margin, both log-probs, accuracy, the pair count."""
    loss = jnp.where(valid, pair_losses(pi_c, pi_r, ref_c, ref_r, beta, kind), 0.0)
    chosen_reward, rejected_reward = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    margin = chosen_reward - rejected_reward

    def total(x):
        return jnp.where(valid, x, 0.0).sum()
    aux = {"ce_sum": loss.sum(), "z_sum": jnp.zeros((), jnp.float32), "tokens": valid.sum(),
           "reward_margin_sum": total(margin), "chosen_reward_sum": total(chosen_reward),
           "rejected_reward_sum": total(rejected_reward), "chosen_logp_sum": total(pi_c),
           "rejected_logp_sum": total(pi_r), "accuracy_sum": total((margin > 0).astype(jnp.float32))}
    return aux["ce_sum"], aux


def response_logps(logits, batch, pairs: int):
    """Summed response log-probs of each pair's two sides, (rows, pairs) each, their token counts, and validity."""
    mask = step_lib.loss_mask(batch)
    ce, _ = step_lib.token_losses(logits, batch["targets"], mask)
    c, r, valid = per_pair(-ce, mask, batch["segment_ids"], pairs)
    nc, nr, _ = per_pair(jnp.ones_like(ce), mask, batch["segment_ids"], pairs)
    return c, r, nc, nr, valid


def reference_logps(ref_model, ref_params, batch, pairs: int):
    """The frozen reference's summed response log-probs (never differentiated)."""
    logits = ref_model.apply({"params": ref_params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    c, r, _, _, _ = response_logps(jax.lax.stop_gradient(logits), batch, pairs)
    return c, r


def loss(policy_forward, ref_model, pairs: int, beta: float, kind: str):
    """`loss(params, extra, batch, rng)` of an Objective: policy_forward(params, extra, batch, rng) gives the
    policy's logits; extra["reference"] holds the reference's parameters."""
    def fn(params, extra, batch, rng):
        pi_c, pi_r, _, _, valid = response_logps(policy_forward(params, extra, batch, rng), batch, pairs)
        ref_c, ref_r = reference_logps(ref_model, extra["reference"], batch, pairs)
        return summed(pi_c, pi_r, ref_c, ref_r, valid, beta, kind)
    return fn
