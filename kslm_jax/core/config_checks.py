"""Range checks for the numeric config keys: every float finite, and each key inside the interval that
its meaning allows.

Types are checked by the schema (config_schema.validate); this is what a value of the right type can
still get wrong. `--config.optim.lr=nan` parses as a float, and a NaN learning rate would otherwise be
applied and saved, then make the workdir's config unequal to itself on every later command.
"""
from __future__ import annotations

import math

import ml_collections

from kslm_jax.core.errors import KslmError

INF = math.inf

# key: (low, high, low inclusive, high inclusive). Keys not listed need only be finite.
RANGES = {
    "model.head_dim": (0, INF, True, False),
    "model.scan_unroll": (1, INF, True, False),
    "model.d_ff": (0, INF, True, False),
    "model.vocab_multiple": (1, INF, True, False),
    "model.rope_theta": (0, INF, False, False),
    "model.norm_eps": (0, INF, False, False),
    "model.init_std": (0, INF, False, False),
    "tokenizer.character_coverage": (0, 1, False, True),
    "tokenizer.sample_sentences": (1, INF, True, False),
    "tokenizer.max_sentence_length": (1, INF, True, False),
    "data.shard_docs": (1, INF, True, False),
    "data.max_segments_per_row": (1, INF, True, False),
    "data.workers": (0, INF, True, False),
    "data.tokenize_workers": (0, INF, True, False),
    "data.cache_mb": (0, INF, True, False),
    "data.streams": (1, INF, True, False),
    "optim.lr": (0, INF, False, False),
    "optim.min_lr_ratio": (0, 1, True, True),
    "optim.warmup_steps": (0, INF, True, False),
    "optim.b1": (0, 1, True, False),
    "optim.b2": (0, 1, True, False),
    "optim.eps": (0, INF, False, False),
    "optim.weight_decay": (0, INF, True, False),
    "optim.grad_clip": (0, INF, True, False),
    "train.steps": (1, INF, True, False),
    "train.step_timeout_s": (0, INF, True, False),
    "train.z_loss": (0, INF, True, False),
    "train.loss_chunk": (0, INF, True, False),
    "train.spike_zscore": (0, INF, True, False),
    "train.log_every": (1, INF, True, False),
    "train.eval_every": (0, INF, True, False),
    "train.eval_batches": (0, INF, True, False),
    "checkpoint.every_steps": (1, INF, True, False),
    "checkpoint.keep": (1, INF, True, False),
    "checkpoint.keep_every": (0, INF, True, False),
    "logging.peak_tflops": (0, INF, True, False),
    "generate.max_new_tokens": (1, INF, True, False),
    "generate.temperature": (0, INF, True, False),
    "generate.top_k": (0, INF, True, False),
    "generate.top_p": (0, 1, False, True),
    "finetune.eval_examples": (0, INF, True, False),
    "finetune.eval_generate": (0, INF, True, False),
    "finetune.max_new_tokens": (1, INF, True, False),
    "finetune.dpo_beta": (0, INF, False, False),
    "lora.rank": (0, INF, True, False),
    "lora.dropout": (0, 1, True, False),
    "eval.shots": (0, INF, True, False),
    "eval.limit": (0, INF, True, False),
    "eval.batch_size": (1, INF, True, False),
}


def _interval(low, high, low_in, high_in) -> str:
    if high == INF:
        return "0 or more" if (low, low_in) == (0, True) else "positive" if low == 0 else f"at least {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_ranges(cfg) -> None:
    """Refuse non-finite floats anywhere in the config and out-of-range values of the keys in RANGES."""
    for key, value in _numbers(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise KslmError(f"config key {key}={value} must be a finite number")
        if key not in RANGES:
            continue
        low, high, low_in, high_in = RANGES[key]
        ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not ok:
            raise KslmError(f"config key {key}={value} must be {_interval(low, high, low_in, high_in)}")
    for axis in ("data", "fsdp", "tensor", "slices"):
        if cfg.mesh[axis] != -1 and cfg.mesh[axis] < 1:
            raise KslmError(f"config key mesh.{axis}={cfg.mesh[axis]} must be -1 (all devices left) or positive")


def profile_steps(spec: str) -> tuple[int, int] | None:
    """logging.profile_steps "START:STOP" as (START, STOP), 1-based and both included; "" is None."""
    if not spec.strip():
        return None
    start, sep, stop = spec.partition(":")
    try:
        first, last = int(start), int(stop)
    except ValueError:
        first = last = 0
    if not sep or not 1 <= first <= last:
        raise KslmError(f"config key logging.profile_steps={spec!r} must be START:STOP with 1 <= START <= STOP, "
                        "e.g. 10:15 (steps 10 to 15, both traced)")
    return first, last


def check_kernels(cfg) -> None:
    """Refuse the speed levers where they would change what is computed instead of how fast."""
    m, t = cfg.model, cfg.train
    if t.loss_impl == "cce":
        if t.z_loss:
            raise KslmError(f"config key train.loss_impl=cce computes no z-loss but train.z_loss={t.z_loss}; "
                            "set train.z_loss=0 or train.loss_impl=dense")
        if cfg.finetune.kind != "none" or cfg.distill.teacher or cfg.distill.cache:
            raise KslmError("config key train.loss_impl=cce applies to pretraining only (fine-tuning and "
                            "distillation need the whole logits); set train.loss_impl=dense")
    if cfg.lora.rank and m.kernels in ("tokamax", "tokamax_glu"):
        raise KslmError(f"config key model.kernels={m.kernels} fuses the gate and up projections, which "
                        "bypasses LoRA adapters and int8 bases; set model.kernels=xla or tokamax_norm")


def check_arch(cfg) -> None:
    """A recurrent model (model.arch=gru|lstm) trains, evaluates and generates; the rest reads the decoder."""
    m = cfg.model
    if m.arch == "decoder":
        return
    if cfg.finetune.kind != "none" or cfg.distill.teacher or cfg.distill.cache:
        raise KslmError(f"config key model.arch={m.arch}: fine-tuning and distillation need the decoder "
                        "(model.arch=decoder); a recurrent model trains, evaluates and generates")
    if m.kernels != "xla" or m.matmul_precision != "default":
        raise KslmError(f"config key model.arch={m.arch}: model.kernels and model.matmul_precision are the "
                        "decoder's levers; leave them at xla and default")


def _numbers(node, prefix):
    for k, v in node.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def same_value(a, b) -> bool:
    """Equality for config values in which NaN equals NaN (a NaN stored by an older version must not make
    a workdir's config differ from itself)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
