"""Range checks for the numeric config keys: every float finite, and each key inside the interval that
its meaning allows.

Types are checked by the schema (config_schema.validate); this is what a value of the right type can
still get wrong. `--config.optim.lr=nan` parses as a float, and a NaN learning rate would otherwise be
applied and saved, then make the workdir's config unequal to itself on every later command.
"""
from __future__ import annotations

import math

import ml_collections

from kslm_jax.core.config_finetune import special_tokens
from kslm_jax.core.errors import KslmError

INF = math.inf

# key: (low, high, low inclusive, high inclusive). Keys not listed need only be finite.
RANGES = {
    "model.head_dim": (0, INF, True, False),
    "model.scan_unroll": (1, INF, True, False),
    "model.fp8_amax_history": (1, INF, True, False),
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
    "mlm.rate": (0, 1, False, False),
    "mlm.mask": (0, 1, True, True),
    "mlm.random": (0, 1, True, True),
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
    if m.matmul_precision == "fp8_delayed" and (cfg.finetune.kind != "none" or cfg.lora.rank or cfg.distill.teacher
                                                or cfg.distill.cache or m.arch != "decoder"):
        raise KslmError("config key model.matmul_precision=fp8_delayed: its scales and amax histories are carried "
                        "by the pretraining loss of the decoder only; for fine-tuning, LoRA, distillation or "
                        "another model.arch set model.matmul_precision=fp8 (current scaling) or default")
    if cfg.lora.rank and m.kernels in ("tokamax", "tokamax_glu"):
        raise KslmError(f"config key model.kernels={m.kernels} fuses the gate and up projections, which "
                        "bypasses LoRA adapters and int8 bases; set model.kernels=xla or tokamax_norm")


def check_arch(cfg) -> None:
    """A recurrent model (model.arch=gru|lstm) trains, evaluates and generates; the encoder pretrains by masked
    LM and fine-tunes a classifier; the rest reads the decoder."""
    m = cfg.model
    if m.arch == "decoder":
        if cfg.finetune.kind == "cls" and cfg.finetune.pool == "first":
            raise KslmError("config key finetune.pool=first: a causal decoder's first token sees only itself; "
                            "use last (or auto) or mean, or fine-tune an encoder (model.arch=encoder)")
        return
    if m.arch == "encoder":
        check_encoder(cfg)
        return
    if cfg.finetune.kind != "none" or cfg.distill.teacher or cfg.distill.cache:
        raise KslmError(f"config key model.arch={m.arch}: fine-tuning and distillation need the decoder "
                        "(model.arch=decoder); a recurrent model trains, evaluates and generates")
    if m.kernels != "xla" or m.matmul_precision != "default":
        raise KslmError(f"config key model.arch={m.arch}: model.kernels and model.matmul_precision are the "
                        "decoder's levers; leave them at xla and default")


def validate_cleaning(d) -> None:
    for key in ("min_chars", "max_chars", "max_repeat", "prepare_workers"):
        if d[key] < 0:
            raise KslmError(f"config key data.{key}={d[key]} must be 0 or more")
    for key in ("min_hangul_ratio", "max_symbol_ratio", "max_dup_line_ratio", "max_top_2gram_ratio",
                "max_top_3gram_ratio", "max_top_4gram_ratio"):
        if not 0.0 <= d[key] <= 1.0:
            raise KslmError(f"config key data.{key}={d[key]} must be in [0, 1]")
    for key in ("ngram", "bands", "rows"):
        if not 1 <= d.dedup[key] <= 1024:
            raise KslmError(f"config key data.dedup.{key}={d.dedup[key]} must be in [1, 1024]")


def validate_distill(cfg) -> None:
    d = cfg.distill
    if not 0.0 <= d.alpha <= 1.0:
        raise KslmError(f"config key distill.alpha={d.alpha} must be in [0, 1] (the weight of the KD term)")
    if d.temperature <= 0:
        raise KslmError(f"config key distill.temperature={d.temperature} must be positive")
    if d.loss == "jsd" and not 0.0 < d.beta < 1.0:
        raise KslmError(f"config key distill.beta={d.beta} must be in (0, 1) for distill.loss=jsd")
    if d.loss == "skew_kl" and not 0.0 <= d.beta < 1.0:
        raise KslmError(f"config key distill.beta={d.beta} must be in [0, 1) for distill.loss=skew_kl")
    if d.topk < 0:
        raise KslmError(f"config key distill.topk={d.topk} must be 0 (whole vocabulary) or positive")
    if d.cache and d.topk < 1:
        raise KslmError("config key distill.cache needs distill.topk > 0: the cache holds the teacher's top-k only")
    if (d.teacher or d.cache) and cfg.train.loss_chunk:
        raise KslmError(f"config key train.loss_chunk={cfg.train.loss_chunk} is not supported with distillation "
                        "(the KD term needs the student's whole logits); set it to 0")


def check_encoder(cfg) -> None:
    f, t, mlm = cfg.finetune, cfg.train, cfg.mlm
    if f.kind not in ("none", "cls") or cfg.distill.teacher or cfg.distill.cache:
        raise KslmError(f"config key model.arch=encoder: finetune.kind={f.kind} and distillation need a causal "
                        "decoder (they score or generate the next token); an encoder pretrains by masked LM "
                        "(finetune.kind=none) and fine-tunes with finetune.kind=cls")
    if f.kind == "cls" and f.head == "label_words":
        raise KslmError("config key finetune.head=label_words scores the next token, which an encoder "
                        "(model.arch=encoder) does not predict; set finetune.head=linear")
    if t.loss_impl != "dense" or t.loss_chunk:
        raise KslmError(f"config keys train.loss_impl={t.loss_impl}, train.loss_chunk={t.loss_chunk}: the masked-LM "
                        "loss of model.arch=encoder reads the logits of the chosen positions only; set "
                        "train.loss_impl=dense and train.loss_chunk=0")
    if mlm.mask + mlm.random > 1.0:
        raise KslmError(f"config keys mlm.mask={mlm.mask} and mlm.random={mlm.random} must sum to 1 or less "
                        "(the rest of the chosen tokens stay unchanged)")
    if mlm.token not in special_tokens(cfg.tokenizer):
        raise KslmError(f"config key mlm.token={mlm.token}: model.arch=encoder masks with this piece, and "
                        f"tokenizer.special_tokens={cfg.tokenizer.special_tokens!r} lacks it; add it (e.g. "
                        f"--config.tokenizer.special_tokens='{mlm.token}') and retrain the tokenizer "
                        "(kslm tokenizer, kslm tokenize)")


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
