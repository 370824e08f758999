"""LoRA on configs/sft_tiny.py: rank-8 adapters on every projection, the base frozen (and kept in int8).

    kslm train --config configs/lora_tiny.py --workdir runs/lora_tiny --config.finetune.init_from=runs/demo_chat
    kslm merge-lora --workdir runs/lora_tiny --out runs/lora_tiny_merged    # a plain workdir, or:
    kslm export --workdir runs/lora_tiny --format hf                       # merges on the way out
The optimizer state and checkpoints hold only the adapters; the training log says how many parameters.
"""
from kslm_jax.core.config import load


def get_config():
    c = load("sft_tiny")
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.targets = "q,k,v,o,gate,up,down"
    c.lora.base_dtype = "int8"       # the frozen base in a quarter of its float32 memory
    c.optim.lr = 3e-3                # adapters start at zero and need a larger step than full fine-tuning
    return c
