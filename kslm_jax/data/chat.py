"""Chat messages → one prompt, the way a GGUF runtime does it: `finetune.template` as a Jinja chat template.

The same template text goes into the GGUF file (`tokenizer.chat_template`) and drives `kslm serve --backend jax`,
so llama.cpp and our own decoder read a conversation identically. An SFT run's template
A{prompt}B{response}C renders every user (or system) message as A+content+B and every assistant message as
content+C; B already opens the assistant's turn, so no generation prompt is added. A model that was not
SFT-tuned gets its messages joined by newlines: plain text is all it has seen. Both open with `bos_token`, which
llama-cpp-python expects a template to add.
Encoding follows llama.cpp: BOS, then the text cut at the tokenizer's special tokens, each other piece
encoded on its own (so each starts a word, as the SFT data's template parts did).
"""
from __future__ import annotations

import json
import re

from kslm_jax.core import config_finetune
from kslm_jax.data import tokenizer as tok_lib

PLAIN = ("{{ bos_token }}{%- for message in messages -%}{%- if not loop.first -%}{{ \"\\n\" }}{%- endif -%}"
         "{{ message['content'] }}{%- endfor -%}")


def _lit(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def chat_template(cfg) -> str:
    """The Jinja chat template of a workdir's model (see the module docstring)."""
    if cfg.finetune.kind not in config_finetune.TEMPLATED:
        return PLAIN
    t = cfg.finetune.template
    a, rest = t.split("{prompt}", 1)
    b, c = rest.split("{response}", 1)
    return ("{{ bos_token }}{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}"
            "{{ message['content'] }}" + _lit(c) + "{%- else -%}" + _lit(a) + "{{ message['content'] }}" + _lit(b)
            + "{%- endif -%}{%- endfor -%}")


def render(template: str, messages: list[dict]) -> str:
    """The template applied in a sandbox, as llama-cpp-python's Jinja2ChatFormatter does; without the BOS text,
    which `encode` adds as an id (runtimes put `bos_token` in, then read it back as the BOS token)."""
    import jinja2.sandbox  # the serve extra's dependency (llama-cpp-python and FastAPI's templates use it)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                             eos_token="")


def encode(sp, text: str) -> list[int]:
    """BOS + ids of `text`, special tokens matched whole and every other stretch encoded separately."""
    specials = tok_lib.user_defined(sp)
    ids = [tok_lib.BOS]
    if not specials:
        return ids + sp.EncodeAsIds(text)
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    for piece in pattern.split(text):
        if piece in specials:
            ids.append(sp.PieceToId(piece))
        elif piece:
            ids.extend(sp.EncodeAsIds(piece))
    return ids
