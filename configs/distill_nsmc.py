"""The student of the distillation benchmark: ~22M parameters, distilled from configs/distill_nsmc_teacher.py.

Same data, tokenizer and packing as the teacher; `--config.distill.teacher=` (empty) trains it from scratch.
    kslm train --config configs/distill_nsmc.py --workdir runs/nsmc_student --config.distill.teacher=runs/nsmc_teacher
"""
from kslm_jax.core.config import load


def get_config():
    c = load("distill_nsmc_teacher")
    c.model.d_model = 384
    c.model.n_layers = 6
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.d_ff = 1024
    c.optim.lr = 2e-3
    c.train.steps = 1500             # 25M tokens for each of the three students
    c.checkpoint.every_steps = 1500
    c.distill.teacher = "runs/nsmc_teacher"
    c.distill.loss = "forward_kl"
    c.distill.temperature = 1.0
    c.distill.alpha = 0.5
    return c
