"""Sentiment classification of NSMC movie reviews with a head on the decoder, on 2 CPU cores (the test size).

Rating ≥ 9 is positive, ≤ 4 negative (the NSMC rule; 5-8 are left out), held out by movie_id, never by row.
    kslm demo --workdir runs/demo
    kslm train --config configs/cls_tiny.py --workdir runs/cls_tiny --config.finetune.init_from=runs/demo
    kslm eval --workdir runs/cls_tiny                       # accuracy and macro-F1 on the held-out movies
Label-word scoring instead of a head: --config.finetune.head=label_words --config.finetune.label_words=별로,최고
--config.finetune.cls_template='{text} 평가:'
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.finetune.kind = "cls"
    c.finetune.train_files = "../shared/data/ko/nsmc_reviews.jsonl.gz"
    c.finetune.text_field = "text"
    c.finetune.label_field = "rating"
    c.finetune.labels = "negative,positive"
    c.finetune.label_bins = "1-4:negative,9-10:positive"
    c.finetune.split_field = "movie_id"
    c.finetune.val_fraction = 0.1
    c.finetune.eval_examples = 2000
    c.finetune.too_long = "truncate"  # a long review keeps its first seq_len tokens
    c.finetune.head = "linear"
    c.data.seq_len = 64
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 20
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
    c.mesh.data = 1
    return c
