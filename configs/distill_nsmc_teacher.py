"""The teacher of the distillation benchmark: ~100M parameters on NSMC movie reviews, one GPU.

    python benchmarks/distill_nsmc.py        (prepares the data, trains this teacher and three students)
    kslm train --config configs/distill_nsmc_teacher.py --workdir runs/nsmc_teacher
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.data.sources = "../shared/data/ko/nsmc_reviews.jsonl.gz"
    c.data.text_field = "text"
    c.data.min_chars = 2             # reviews are short; "최고", "별로" are whole reviews
    c.data.val_fraction = 0.02
    c.data.seq_len = 256             # ~10 reviews per packed row
    c.data.split_field = "movie_id"  # held-out reviews are of other movies than the training ones
    c.data.workers = 4               # packing keeps up with a small model's step rate
    c.tokenizer.vocab_size = 16000
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.n_heads = 12
    c.model.n_kv_heads = 4
    c.model.d_ff = 2048
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.model.scan_layers = False      # unrolled layers are faster on one GPU (benchmarks/README.md)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.train.batch_size = 64
    c.train.steps = 2000             # 33M tokens, ~3 passes over the 11M training tokens
    c.train.log_every = 100
    c.train.eval_every = 500         # the held-out curve shows whether more passes would still help
    c.checkpoint.every_steps = 2000
    return c
