"""SentencePiece training and loading, and the fertility report on held-out text."""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from kslm_jax.errors import KslmError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def _sentences(texts: Iterable[str], max_len: int):
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while len(line) > max_len:
                yield line[:max_len]
                line = line[max_len:]
            if line:
                yield line


def train(texts: Iterable[str], out_path: Path, tcfg, seed: int = 0) -> spm.SentencePieceProcessor:
    """Train BPE (or unigram) with byte fallback on already-NFC text; writes out_path (+ .vocab)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_path.parent))
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, tcfg.max_sentence_length),
            model_prefix=str(tmp / "spm"),
            model_type=tcfg.model_type,
            vocab_size=tcfg.vocab_size,
            character_coverage=tcfg.character_coverage,
            byte_fallback=tcfg.byte_fallback,
            split_digits=tcfg.split_digits,
            # Our cleaner already applied NFC; SentencePiece's default NFKC would rewrite compatibility jamo.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            input_sentence_size=tcfg.sample_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=tcfg.max_sentence_length * 4,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e)
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            raise KslmError(f"tokenizer.vocab_size={m.group(1)} cannot hold the {m.group(2)} distinct characters that "
                            f"character_coverage={tcfg.character_coverage} keeps; raise --config.tokenizer.vocab_size "
                            "or lower --config.tokenizer.character_coverage") from None
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise KslmError(f"corpus too small for tokenizer.vocab_size={m.group(1)}: SentencePiece can build at most "
                            f"{m.group(2)} pieces from it; lower --config.tokenizer.vocab_size or add text") from None
        raise KslmError(f"SentencePiece training failed: {msg.strip().splitlines()[-1]}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for ext in (".model", ".vocab"):
        shutil.move(str(tmp / f"spm{ext}"), str(out_path.with_suffix(ext)))
    shutil.rmtree(tmp, ignore_errors=True)
    return load(out_path)


def load(path: Path) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        raise KslmError(f"tokenizer {path} not found; run `kslm tokenizer` for this workdir first")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise KslmError(f"tokenizer {path} is not a SentencePiece model ({e}); retrain it with `kslm tokenizer`") from None
    return sp


def fertility(sp: spm.SentencePieceProcessor, texts: Iterable[str]) -> dict:
    """Tokens per character, per eojeol (space-separated word) and per UTF-8 byte; byte-fallback rate."""
    chars = words = nbytes = tokens = fallback = 0
    used = np.zeros(sp.GetPieceSize(), bool)
    for text in texts:
        ids = sp.EncodeAsIds(text)
        chars += len(text)
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
        tokens += len(ids)
        fallback += sum(1 for i in ids if sp.IsByte(i))
        used[ids] = True
    if not tokens:
        return {}
    return dict(
        tokens=tokens,
        tokens_per_char=tokens / max(chars, 1),
        tokens_per_word=tokens / max(words, 1),
        tokens_per_byte=tokens / max(nbytes, 1),
        byte_fallback_rate=fallback / tokens,
        vocab_used=float(used.mean()),
    )
