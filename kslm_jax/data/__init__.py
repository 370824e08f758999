"""Raw text to token batches: readers, cleaning, filters, dedup, prepare, tokenizers, token shards, the
loader and fine-tuning examples. It imports only core: data never depends on the model that consumes it.
"""
