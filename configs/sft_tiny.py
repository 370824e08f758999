"""Supervised fine-tuning of a small model on Korean question/answer pairs, on 2 CPU cores (the test size).

The chat template needs a base whose tokenizer has the special tokens, e.g. the README demo made with them:
    kslm demo --workdir runs/demo_chat --config.tokenizer.special_tokens='<|user|>,<|assistant|>,<|end|>'
    kslm train --config configs/sft_tiny.py --workdir runs/sft_tiny --config.finetune.init_from=runs/demo_chat
    kslm generate --workdir runs/sft_tiny --prompt '오늘 너무 피곤해'
The model shape and tokenizer keys come from finetune.init_from; the loss is on the answers only.
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.finetune.kind = "sft"
    c.finetune.train_files = "../shared/data/ko/chatbot_qa.csv"
    c.finetune.prompt_field = "Q"
    c.finetune.response_field = "A"
    c.finetune.val_fraction = 0.05   # ~590 held-out pairs, chosen by a hash of the pair
    c.finetune.eval_examples = 256
    c.finetune.eval_generate = 16    # greedy answers scored by ROUGE-L and BLEU at each evaluation
    c.finetune.max_new_tokens = 32
    c.data.seq_len = 64              # a pair is ~15 tokens: several whole pairs per row
    c.optim.lr = 1e-3                # a tenth of pretraining's: the base already knows Korean
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 20
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
    c.mesh.data = 1
    return c
