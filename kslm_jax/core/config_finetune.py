"""Config rules of fine-tuning: the finetune, lora and special-token keys, and what a run takes from its base."""
from __future__ import annotations

import re

from kslm_jax.core.errors import KslmError

# Fine-tuning kinds whose model reads its prompts through finetune.template (generate, serve, export, tasks).
TEMPLATED = ("sft", "dpo")
SPECIAL_FORM = re.compile(r"<\|[^|<>\s]+\|>")


def special_tokens(tcfg) -> list[str]:
    """`tokenizer.special_tokens` as a list; each must look like <|name|> so a template can find it."""
    out = [t.strip() for t in tcfg.special_tokens.split(",") if t.strip()]
    for t in out:
        if not SPECIAL_FORM.fullmatch(t):
            raise KslmError(f"config key tokenizer.special_tokens: {t!r} is not of the form <|name|> "
                            "(letters, digits, _ or - between <| and |>)")
    if len(set(out)) != len(out):
        raise KslmError(f"config key tokenizer.special_tokens={tcfg.special_tokens!r} names a token twice")
    return out


LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}


def lora_targets(cfg) -> list[str]:
    """Module names from `lora.targets` (q or q_proj, ...); an unknown name is an error naming the key."""
    out = []
    for t in (x.strip() for x in cfg.lora.targets.split(",")):
        if not t:
            continue
        name = LORA_TARGETS.get(t, t)
        if name not in LORA_TARGETS.values():
            raise KslmError(f"config key lora.targets: {t!r} matches no module of the model (targets: "
                            f"{', '.join(LORA_TARGETS)}, or their module names {', '.join(LORA_TARGETS.values())})")
        if name not in out:
            out.append(name)
    if not out:
        raise KslmError("config key lora.targets is empty; name at least one projection, e.g. q,v")
    return out


def validate(cfg) -> None:
    """The finetune, lora and tokenizer.special_tokens keys against each other."""
    special_tokens(cfg.tokenizer)  # each <|name|>, none twice
    f, lo = cfg.finetune, cfg.lora
    if f.kind == "none":
        if lo.rank:
            raise KslmError(f"config key lora.rank={lo.rank} needs finetune.kind=sft, cls or dpo "
                            "(and finetune.init_from)")
        return
    if not f.train_files:
        raise KslmError(f"config key finetune.train_files is empty; finetune.kind={f.kind} needs example files")
    if not 0.0 <= f.val_fraction < 1.0:
        raise KslmError(f"config key finetune.val_fraction={f.val_fraction} must be in [0, 1)")
    if f.kind in ("sft", "dpo"):
        for key in ("{prompt}", "{response}"):
            if f.template.count(key) != 1:
                raise KslmError(f"config key finetune.template must hold {key} once: {f.template!r}")
        if f.template.index("{prompt}") > f.template.index("{response}"):
            raise KslmError("config key finetune.template: {prompt} must come before {response}")
    if f.kind == "dpo":
        if not f.init_from:
            raise KslmError("finetune.kind=dpo needs finetune.init_from: the policy and its frozen reference both "
                            "start from that model")
        if f.chosen_field == f.rejected_field:
            raise KslmError(f"config keys finetune.chosen_field and finetune.rejected_field both name "
                            f"{f.chosen_field!r}; a pair needs two different responses")
    if f.kind == "cls":
        if f.cls_template.count("{text}") != 1:
            raise KslmError(f"config key finetune.cls_template must hold {{text}} once: {f.cls_template!r}")
        if len([x for x in f.labels.split(",") if x.strip()]) < 2:
            raise KslmError(f"config key finetune.labels={f.labels!r}: name at least two classes, e.g. negative,positive")
    if lo.rank < 0 or lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0:
        raise KslmError(f"config keys lora.rank={lo.rank}, lora.alpha={lo.alpha}, lora.dropout={lo.dropout}: "
                        "rank must be 0 (off) or more, alpha positive, dropout in [0, 1)")
    if lo.rank:
        lora_targets(cfg)
    elif lo.base_dtype != "float32":
        raise KslmError(f"config key lora.base_dtype={lo.base_dtype} applies to LoRA runs only (lora.rank > 0)")
