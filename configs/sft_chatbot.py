"""Supervised fine-tuning on the Korean chatbot QA pairs (loss on the answers), one GPU.

    kslm train --config configs/sft_chatbot.py --workdir runs/sft_chatbot --config.finetune.init_from=runs/nsmc_base
The base needs tokenizer.special_tokens with <|user|>, <|assistant|>, <|end|> (configs/finetune_nsmc_base.py).
Held-out: 5% of the pairs by hash; evaluation reports answer perplexity and, on greedy answers, ROUGE-L/BLEU.
"""
from kslm_jax.core.config import load


def get_config():
    c = load("sft_tiny")
    c.data.seq_len = 128
    c.data.workers = 2               # batches packed ahead in a background thread
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.finetune.eval_examples = 0     # every held-out pair
    c.finetune.eval_generate = 200
    c.finetune.max_new_tokens = 48
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 50
    c.train.batch_size = 32
    c.train.steps = 600              # ~5 passes over the 11k training pairs
    c.train.log_every = 50
    c.train.eval_every = 0
    c.checkpoint.every_steps = 600
    return c
