"""Distil the README demo model (configs/tiny_ko.py) into a student half its width on 2 CPU cores.

The student must read the teacher's tokenizer, so its workdir starts from the teacher's:
    kslm demo --workdir runs/demo
    kslm prepare --config configs/distill_tiny.py --workdir runs/distill_tiny
    mkdir -p runs/distill_tiny/tokenizer && cp runs/demo/tokenizer/spm.* runs/distill_tiny/tokenizer/
    kslm tokenize --workdir runs/distill_tiny
    kslm train --workdir runs/distill_tiny
Or start from the pruned teacher (same tokenizer and token shards, linked):
    kslm prune --teacher runs/demo --workdir runs/distill_tiny_pruned --n-layers 2 --d-model 64 --n-heads 2 \
        --n-kv-heads 1 --d-ff 192 --config.distill.teacher=runs/demo
    kslm train --workdir runs/distill_tiny_pruned
"""
from kslm_jax.core.config import load


def get_config():
    c = load("tiny_ko")              # the teacher's data and tokenizer settings: the same corpus and pieces
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 2
    c.model.n_kv_heads = 1
    c.model.d_ff = 192
    c.distill.teacher = "runs/demo"
    c.distill.loss = "forward_kl"
    c.distill.temperature = 1.0
    c.distill.alpha = 0.5            # half KD, half ground-truth CE
    return c
