"""Full fine-tuning for NSMC sentiment (rating ≥ 9 positive, ≤ 4 negative), held out by movie_id; one GPU.

    kslm train --config configs/cls_nsmc.py --workdir runs/cls_nsmc --config.finetune.init_from=runs/nsmc_base
configs/finetune_nsmc_base.py pretrains such a base; benchmarks/finetune_nsmc.py runs both.
"""
from kslm_jax.core.config import load


def get_config():
    c = load("cls_tiny")
    c.data.seq_len = 128             # ~6 reviews per row; a longer review keeps its first 128 tokens
    c.data.workers = 2               # batches packed ahead in a background thread
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.finetune.eval_examples = 0     # every held-out review (~45k)
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 50
    c.train.batch_size = 64
    c.train.steps = 800
    c.train.log_every = 50
    c.train.eval_every = 0
    c.checkpoint.every_steps = 800
    return c
