"""Pure step functions: loss, gradients, optimizer update and metrics, compiled once by jax.jit."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kslm_jax.core import sharding
from kslm_jax.model import fp8, llama
from kslm_jax.train import optim

# optax.global_norm is deprecated in recent optax in favour of optax.tree.norm; older releases lack the latter.
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def token_losses(logits, targets, mask, z_loss: float = 0.0):
    """Per-token cross-entropy (nats) and z-loss, in float32, zero where mask is False."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A compare-and-sum instead of a gather: its gradient is an elementwise select that fuses with the
    # softmax gradient, where a gather's is a scatter into a zeroed B*T*V buffer.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    ce = jnp.where(mask, lse - target_logit, 0.0)
    z = jnp.where(mask, z_loss * jnp.square(lse), 0.0)
    return ce, z


def chunked_loss_sums(hidden_BTD, kernel_DV, targets, mask, z_loss: float, chunk: int):
    """Summed CE and z-loss with logits made `chunk` positions at a time and rebuilt in the backward pass.

    Peak logits memory drops from B*T*V fp32 to B*chunk*V; the bf16 matmul accumulates in fp32.
    """
    b, t, _ = hidden_BTD.shape
    n = t // chunk

    @jax.checkpoint
    def piece(args):
        h, tg, m = args
        logits = jnp.einsum("bcd,dv->bcv", h, kernel_DV.astype(h.dtype), preferred_element_type=jnp.float32)
        ce, z = token_losses(logits, tg, m, z_loss)
        return ce.sum(), z.sum()

    def split(a):
        return a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    ce, z = jax.lax.map(piece, (split(hidden_BTD), split(targets), split(mask)))
    return ce.sum(), z.sum()


def cce_loss_sum(hidden_BTD, kernel_DV, targets, mask):
    """Summed CE of the counted tokens by jax-cce's fused linear + cross-entropy, which walks the vocabulary
    in chunks and never holds the B*T*V logits (`train.loss_impl=cce`; it has no z-loss).

    jax-cce returns the mean over every row and takes no mask: uncounted rows enter as zero vectors, whose
    logits are all 0, so each adds exactly log(V) to the sum and nothing to any gradient (d/dx is cut by the
    select, d/dW is x-weighted), and that constant is taken back out.
    """
    import jax_cce

    d, v = kernel_DV.shape
    x = jnp.where(mask[..., None], hidden_BTD, 0).reshape(-1, d)
    mean = jax_cce.linear_cross_entropy(x, kernel_DV.T.astype(x.dtype), targets.reshape(-1))
    n = x.shape[0]
    return mean * n - (n - mask.sum()).astype(jnp.float32) * jnp.log(jnp.float32(v))


def loss_mask(batch):
    """Tokens that count: real (segment id > 0) and, when the batch says so, marked as targets (SFT answers)."""
    mask = batch["segment_ids"] > 0
    if "loss_mask" in batch:
        mask = mask & (batch["loss_mask"] > 0)
    return mask


def loss_fn(params, model, batch, z_loss, loss_chunk: int = 0, loss_impl: str = "dense", fp8_meta=None):
    """The pretraining loss: (summed CE + z-loss over the batch's counted tokens, sums for the log).
    `fp8_meta`: the scales and amax histories of model.matmul_precision=fp8_delayed (TrainState.fp8_meta)."""
    mask = loss_mask(batch)
    t = batch["inputs"].shape[-1]
    chunked = bool(loss_chunk and loss_chunk < t and t % loss_chunk == 0)
    variables = {"params": params, **({fp8.META: fp8_meta} if fp8_meta else {})}
    # Both fused paths take the final hidden states and the output matrix, never the (B, T, V) logits.
    out = model.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"],
                      return_hidden=loss_impl == "cce" or chunked)
    if loss_impl == "cce":
        ce_sum = cce_loss_sum(out, llama.output_kernel(params, model.c), batch["targets"], mask)
        z_sum = jnp.zeros((), jnp.float32)
    elif chunked:
        ce_sum, z_sum = chunked_loss_sums(out, llama.output_kernel(params, model.c), batch["targets"], mask,
                                          z_loss, loss_chunk)
    else:
        ce, z = token_losses(out, batch["targets"], mask, z_loss)
        ce_sum, z_sum = ce.sum(), z.sum()
    return ce_sum + z_sum, {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": mask.sum()}


def lm_loss(model, z_loss: float, loss_chunk: int = 0, loss_impl: str = "dense"):
    """The pretraining loss as an Objective's `loss(params, extra, batch, rng) -> (sum, aux)`; the one loss that
    also takes `fp8_meta` (config_checks keeps fp8_delayed to pretraining)."""
    def loss(params, extra, batch, rng, fp8_meta=None):
        del extra, rng  # the decoder has no dropout
        return loss_fn(params, model, batch, z_loss, loss_chunk, loss_impl, fp8_meta)
    return loss


def accumulate(loss, params, extra, batch, rng, accum: int):
    """(gradients, aux) of the whole global batch: see accumulate_with_meta, of a state without FP8 meta."""
    grads, aux, _ = accumulate_with_meta(loss, params, {}, extra, batch, rng, accum)
    return grads, aux


def accumulate_with_meta(loss, params, meta, extra, batch, rng, accum: int):
    """(gradients, aux, new FP8 meta) of the whole global batch: gradients summed over micro-batches, divided
    by its total count.

    Each loss returns a sum over its micro-batch and the count it summed over (real tokens, or examples for
    a classifier), so with k micro-batches of any padding this is exactly the gradient of one big batch. The
    jitted step sees the global batch of every process, so the count is global too: no process normalizes by
    its own share. Micro-batch i draws its random numbers from fold_in(rng, i).

    `meta` (fp8_delayed's scales and amax histories; {} otherwise) goes into the loss as `fp8_meta`, and its
    "gradient" is its new value (Flax's overwrite-with-gradient), never divided or summed. Every micro-batch
    reads the step's meta, so all cast with the same scales and compute the same new scales and rolled
    history; the newest amax entries differ, and their elementwise maximum is what one big batch would have
    recorded (the amax of a union is the largest of the parts' amaxes).
    """
    def lossm(p, m, e, b, r):
        return loss(p, e, b, r, fp8_meta=m) if m else loss(p, e, b, r)

    grad_fn = jax.grad(lossm, argnums=(0, 1), has_aux=True)
    if accum == 1:
        (grads, new_meta), aux = grad_fn(params, meta, extra, batch, jax.random.fold_in(rng, 0))
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
        # Micro-batches run in a scan: one compiled body, gradients summed in float32, one update.
        def micro(carry, xs):
            i, mb = xs
            (g, m), a = grad_fn(params, meta, extra, mb, jax.random.fold_in(rng, i))
            g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
            grads, new_meta, aux = carry
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.maximum, new_meta, m),
                    jax.tree.map(jnp.add, aux, a)), None
        first = jax.tree.map(lambda x: x[0], batch)
        aux_shape = jax.eval_shape(lambda: lossm(params, meta, extra, first, rng)[1])
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        lowest = jax.tree.map(lambda m: jnp.full(m.shape, -jnp.inf, m.dtype), meta)
        no_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
        (grads, new_meta, aux), _ = jax.lax.scan(micro, (zeros, lowest, no_aux), (jnp.arange(accum), batch))
    n = jnp.maximum(aux["tokens"], 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
    return grads, aux, new_meta


def train_step(state, batch, extra=None, *, loss, tx, lr_fn, accum: int, rules=sharding.RULES):
    # Every random draw of this step comes from (seed, step, micro-batch): a resumed run draws the same ones.
    rng = jax.random.fold_in(state.rng, state.step)
    with nn.logical_axis_rules(rules):
        grads, aux, meta = accumulate_with_meta(loss, state.params, state.fp8_meta, extra, batch, rng, accum)
        count = optim.schedule_count(state.opt_state, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    grad_norm = _norm(grads)
    # A non-finite loss, gradient or update never reaches the weights: the step keeps the old parameters and
    # optimizer state, and reports itself so the loop can count it, restore, or stop (train.nonfinite).
    # Keeping the optimizer state keeps optax's schedule count too, so a skipped step does not advance the
    # learning-rate schedule: the schedule counts applied updates, and `lr` is the rate this step's update
    # was (or would have been) computed with.
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(aux["ce_sum"]) & jnp.isfinite(_norm(updates))
    params, opt_state, meta = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state, meta),
                                           (state.params, state.opt_state, state.fp8_meta))
    metrics = dict(aux, grad_norm=grad_norm, lr=lr_fn(count), param_norm=_norm(params),
                   nonfinite=(~finite).astype(jnp.int32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, fp8_meta=meta)
    return new_state, metrics


def eval_step(params, batch, *, model, rules=sharding.RULES):
    with nn.logical_axis_rules(rules):
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = loss_mask(batch)
    ce, _ = token_losses(logits, batch["targets"], mask)
    return {"ce_sum": ce.sum(), "tokens": mask.sum()}


def jit_train_step(loss, tx, lr_fn, accum, mesh, state_shardings, extra_shardings=None, rules=sharding.RULES):
    """Compiled step `(state, batch, extra) -> (state, metrics)`; the state is donated, `extra` is not.

    The batch takes the shardings sharding.global_batch gave it, so objectives may add arrays of any rank.
    """
    fn = functools.partial(train_step, loss=loss, tx=tx, lr_fn=lr_fn, accum=accum, rules=rules)
    return jax.jit(fn, in_shardings=(state_shardings, None, extra_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(model, mesh, param_shardings, rules=sharding.RULES):
    fn = functools.partial(eval_step, model=model, rules=rules)
    return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
