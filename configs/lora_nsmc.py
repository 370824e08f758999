"""LoRA for NSMC sentiment: rank-16 adapters on every projection plus the linear head, the base frozen.

    kslm train --config configs/lora_nsmc.py --workdir runs/lora_nsmc --config.finetune.init_from=runs/nsmc_base
Add --config.lora.base_dtype=int8 to keep the frozen base in int8.
"""
from kslm_jax.core.config import load


def get_config():
    c = load("cls_nsmc")
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.lr = 2e-3                # adapters start at zero; a larger step than full fine-tuning
    return c
