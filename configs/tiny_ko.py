"""The README demo: a ~1M-parameter Korean model trained in a few minutes on 2 CPU cores.

Corpus: the constitution and bill texts shipped inside the KoNLPy wheel (no download).
    kslm demo --workdir runs/demo
    kslm train --config configs/tiny_ko.py --workdir runs/demo --config.train.steps=600
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.data.sources = "demo"
    c.data.text_mode = "paragraph"   # the bill texts break lines mid-sentence; blocks keep sentences whole
    c.data.val_fraction = 0.1
    c.data.min_chars = 4           # keeps short clauses such as "제1장 총강"
    c.data.seq_len = 128
    c.tokenizer.vocab_size = 2000    # ~65k characters of text support about this many BPE pieces
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.tie_embeddings = True    # halves the parameters a small corpus has to pin down
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    c.train.steps = 150             # ~7 passes over 20k training tokens; held-out loss rises after ~150
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    return c
