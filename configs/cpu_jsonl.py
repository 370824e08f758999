"""Your own JSON-lines file on a laptop CPU (2 cores): from raw records to a sampled model in about 15 minutes.

Each line of the file is a JSON object; `text` holds the document (set data.text_field for another key,
a.b for a nested one). Set data.split_field to a key that groups records (a movie, a thread, an author) so no
group is on both sides of the held-out split; leave it "" to split by the text itself.

    kslm prepare   --config configs/cpu_jsonl.py --workdir runs/mine --config.data.sources=reviews.jsonl
    kslm tokenizer --workdir runs/mine
    kslm tokenize  --workdir runs/mine
    kslm train     --workdir runs/mine
    kslm generate  --workdir runs/mine

`kslm config --show --config configs/cpu_jsonl.py` lists every key this recipe leaves at its default.
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.data.sources = ""              # your file(s): --config.data.sources=path/to/file.jsonl (globs work)
    c.data.text_field = "text"
    c.data.split_field = ""          # e.g. "movie_id"
    c.data.val_fraction = 0.05
    c.data.min_chars = 10
    c.data.seq_len = 128             # short reviews and posts; raise for long documents
    c.tokenizer.vocab_size = 4000    # enough for ~1M characters of text; use 8000+ for 10M+
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.tie_embeddings = True
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600              # ~1.2M tokens: one pass over ~35k short reviews, about 5 minutes on 2 cores
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.eval_every = 200
    c.checkpoint.every_steps = 200
    return c
