"""GPT-2-small-sized Korean model (~125M with a 32k vocabulary) for one GPU.

    kslm train --config configs/ko_125m.py --workdir runs/ko_125m --config.data.sources='corpus/*.jsonl.gz'
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.tokenizer.vocab_size = 32000
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.n_heads = 12
    c.model.n_kv_heads = 12
    c.model.d_ff = 2048
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.model.scan_layers = False      # unrolled: +31% tokens/s at 124M on an H100 (benchmarks/README.md)
    c.data.seq_len = 1024
    c.data.workers = 4
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 1000
    c.train.steps = 50_000
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.eval_batches = 50
    c.checkpoint.every_steps = 1000
    return c
