"""SentencePiece training and loading, special tokens for chat templates, and the fertility report."""
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
_SPECIAL_FORM = re.compile(r"<\|[^|<>\s]+\|>")


def special_tokens(tcfg) -> list[str]:
    """`tokenizer.special_tokens` as a list; each must look like <|name|> so a template can find it."""
    out = [t.strip() for t in tcfg.special_tokens.split(",") if t.strip()]
    for t in out:
        if not _SPECIAL_FORM.fullmatch(t):
            raise KslmError(f"config key tokenizer.special_tokens: {t!r} is not of the form <|name|> "
                            "(letters, digits, _ or - between <| and |>)")
    if len(set(out)) != len(out):
        raise KslmError(f"config key tokenizer.special_tokens={tcfg.special_tokens!r} names a token twice")
    return out


def special_ids(sp: spm.SentencePieceProcessor, names, where: str) -> dict[str, int]:
    """Piece ids of special tokens, or one error naming the first the tokenizer does not have."""
    out = {}
    have = user_defined(sp)
    for name in names:
        i = sp.PieceToId(name)
        if name not in have or sp.IdToPiece(i) != name:
            raise KslmError(f"{where} uses the special token {name}, which the tokenizer does not have "
                            f"(its special tokens: {', '.join(have) or 'none'}); add it to tokenizer.special_tokens "
                            "and retrain the tokenizer (`kslm tokenizer`), or change the template")
        out[name] = i
    return out


def user_defined(sp: spm.SentencePieceProcessor) -> list[str]:
    """The tokenizer's user-defined pieces (its special tokens), read from the model itself."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == kind]


def find_special(text: str) -> list[str]:
    """Every <|name|> in a template, in order."""
    return _SPECIAL_FORM.findall(text)


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
            # Chat-template markers become single pieces that encode and decode as their own text.
            user_defined_symbols=special_tokens(tcfg),
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
