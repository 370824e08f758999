"""The README demo's model as a masked-LM encoder: tiny_ko's Llama blocks, bidirectional within each document.

Same corpus, sizes and schedule as tiny_ko (about 1.05M parameters); the tokenizer gains one piece, <|mask|>.
    kslm prepare --config configs/encoder_tiny_ko.py --workdir runs/enc   (then kslm tokenizer, kslm tokenize)
    kslm train --config configs/encoder_tiny_ko.py --workdir runs/enc
    kslm eval --workdir runs/enc                      (held-out masked-LM loss and accuracy)
A cls fine-tune reads it with finetune.init_from=runs/enc (first-token pooling: finetune.pool=auto).
"""
from kslm_jax.core.config import load


def get_config():
    c = load("tiny_ko")
    c.model.arch = "encoder"                 # the same blocks, attention over the whole document
    c.tokenizer.special_tokens = "<|mask|>"  # mlm.token: the piece chosen tokens are replaced by
    c.mlm.rate = 0.15                        # BERT's: 15% of tokens chosen, 80% masked / 10% random / 10% kept
    c.mlm.whole_eojeol = True                # Korean words are several pieces; mask them together
    return c
