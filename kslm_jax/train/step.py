"""Pure step functions: loss, gradients, optimizer update and metrics, compiled once by jax.jit."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kslm_jax import sharding

# optax.global_norm is deprecated in recent optax in favour of optax.tree.norm; older releases lack the latter.
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def token_losses(logits, targets, mask, z_loss: float = 0.0):
    """Per-token cross-entropy (nats) and z-loss, in float32, zero where mask is False."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.where(mask, lse - target_logit, 0.0)
    z = jnp.where(mask, z_loss * jnp.square(lse), 0.0)
    return ce, z


def loss_fn(params, model, batch, z_loss):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["segment_ids"] > 0
    ce, z = token_losses(logits, batch["targets"], mask, z_loss)
    n = jnp.maximum(mask.sum(), 1)
    return (ce.sum() + z.sum()) / n, {"ce_sum": ce.sum(), "z_sum": z.sum(), "tokens": mask.sum()}


def train_step(state, batch, *, model, tx, lr_fn, z_loss: float, accum: int):
    with nn.logical_axis_rules(sharding.RULES):
        grad_fn = jax.grad(loss_fn, has_aux=True)
        if accum == 1:
            grads, aux = grad_fn(state.params, model, batch, z_loss)
        else:
            # Micro-batches run in a scan: one compiled body, gradients summed in float32, one update.
            def micro(carry, mb):
                g, a = grad_fn(state.params, model, mb, z_loss)
                return jax.tree.map(jnp.add, carry, (g, a)), None
            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {"ce_sum": 0.0, "z_sum": 0.0, "tokens": jnp.zeros((), jnp.int32)})
            (grads, aux), _ = jax.lax.scan(micro, zeros, batch)
            grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = dict(aux, grad_norm=_norm(grads), lr=lr_fn(state.step),
                   param_norm=_norm(params))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch, *, model):
    with nn.logical_axis_rules(sharding.RULES):
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["segment_ids"] > 0
    ce, _ = token_losses(logits, batch["targets"], mask)
    return {"ce_sum": ce.sum(), "tokens": mask.sum()}


def jit_train_step(model, tx, lr_fn, z_loss, accum, mesh, state_shardings):
    fn = functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, z_loss=z_loss, accum=accum)
    batch_s = sharding.batch_sharding(mesh, 3 if accum > 1 else 2, accum > 1)
    return jax.jit(fn, in_shardings=(state_shardings, batch_s),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(model, mesh, param_shardings):
    fn = functools.partial(eval_step, model=model)
    return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
