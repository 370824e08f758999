"""The language model of the tokenizer benchmark: the ~22M distillation student, trained from scratch.

benchmarks/tokenizers.py trains one per tokenizer variant (tokenizer.* set on the command line), all for the
same steps of the same batch shape, and compares their held-out bits per character.
    kslm train --config configs/tokenizer_nsmc.py --workdir runs/tok_bpe16k --config.tokenizer.pretokenize=kiwi
"""
from kslm_jax.core.config import load


def get_config():
    c = load("distill_nsmc")
    c.distill.teacher = ""
    c.train.eval_every = 0           # one held-out evaluation, at the end
    return c
