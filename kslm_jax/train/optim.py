"""The optimizer: AdamW with warmup + cosine decay and global-norm clipping, decay on matrices only."""
from __future__ import annotations

import jax
import optax


def schedule(ocfg, total_steps: int) -> optax.Schedule:
    warmup = min(ocfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=ocfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)


def _decay_mask(params):
    # Norm scales (1-D) keep their value; weight decay would pull them toward zero for no gain.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(ocfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(ocfg, total_steps)
    parts = []
    if ocfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(ocfg.grad_clip))
    parts.append(optax.adamw(lr, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), lr


def schedule_count(opt_state, fallback):
    """The step count optax's learning-rate schedule reads: the number of updates applied so far."""
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
             if isinstance(s, optax.ScaleByScheduleState)]
    return found[0] if found else fallback
