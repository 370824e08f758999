"""The base model of the fine-tuning benchmark: ~22M parameters pretrained on NSMC reviews, one GPU.

Its tokenizer carries the chat markers, so the same base serves classification and SFT; held-out reviews
are of other movies (movie_id), with the same hash and share as the classification recipes' held-out split.
    python benchmarks/finetune_nsmc.py          (prepares, pretrains this, then fine-tunes four ways)
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.data.sources = "../shared/data/ko/nsmc_reviews.jsonl.gz"
    c.data.text_field = "text"
    c.data.min_chars = 2             # "최고", "별로" are whole reviews
    c.data.val_fraction = 0.1        # = finetune.val_fraction of configs/cls_nsmc.py: the same held-out movies
    c.data.split_field = "movie_id"
    c.data.seq_len = 256
    c.data.workers = 4
    c.tokenizer.vocab_size = 16000
    c.tokenizer.sample_sentences = 300000
    c.tokenizer.special_tokens = "<|user|>,<|assistant|>,<|end|>"
    c.model.d_model = 384
    c.model.n_layers = 6
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.d_ff = 1024
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.model.scan_layers = False      # unrolled layers are faster on one GPU (benchmarks/README.md)
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.train.batch_size = 64
    c.train.steps = 1200             # 20M tokens, ~2 passes over the training reviews
    c.train.log_every = 100
    c.checkpoint.every_steps = 1200
    return c
