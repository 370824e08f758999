"""The README demo with a recurrent model: a GRU with the decoder's parameter count on the same corpus.

Eight GRU layers of width 128 (98,944 parameters each) stand in for tiny_ko's four decoder blocks (196,864
each); the tied embedding is the same, so both have about 1.05M parameters. benchmarks/README.md compares them.
    kslm demo --workdir runs/demo                     (prepares the corpus and trains the decoder)
    kslm train --config configs/gru_tiny_ko.py --workdir runs/gru   (after prepare/tokenizer/tokenize there)
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.data.sources = "demo"
    c.data.text_mode = "paragraph"
    c.data.val_fraction = 0.1
    c.data.min_chars = 4
    c.data.seq_len = 128
    c.tokenizer.vocab_size = 2000
    c.model.arch = "gru"             # nn.GRUCell under nn.RNN; the state restarts at each packed document
    c.model.d_model = 128            # the GRU state's width
    c.model.n_layers = 8             # twice tiny_ko's: a GRU layer has half a decoder block's parameters
    c.model.tie_embeddings = True
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    c.train.steps = 150
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    return c
