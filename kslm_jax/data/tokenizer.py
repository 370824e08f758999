"""SentencePiece training and loading, special tokens for chat templates, and the fertility report."""
from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.config_finetune import SPECIAL_FORM as _SPECIAL_FORM  # noqa: F401
from kslm_jax.core.config_finetune import special_tokens
from kslm_jax.core.errors import KslmError
from kslm_jax.data import jamo, morph

PAD, UNK, BOS, EOS = 0, 1, 2, 3
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


def user_defined(sp: spm.SentencePieceProcessor, proto=None) -> list[str]:
    """The tokenizer's user-defined pieces (its special tokens), read from the model itself."""
    from sentencepiece import sentencepiece_model_pb2
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in (proto or model_proto(sp)).pieces if p.type == kind]


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


def _reservoir(items, k: int, seed: int) -> list:
    """A uniform sample of k items from a stream of unknown length, in one pass (all of them if fewer)."""
    rng = random.Random(seed)
    out = []
    for n, item in enumerate(items):
        if n < k:
            out.append(item)
        else:
            j = rng.randint(0, n)
            if j < k:
                out[j] = item
    return out


def _marked(sentences, segmenter, batch: int = 4096):
    buf = []
    for s in sentences:
        buf.append(s)
        if len(buf) == batch:
            yield from segmenter.mark(buf)
            buf = []
    yield from segmenter.mark(buf)


def train(texts: Iterable[str], out_path: Path, tcfg, seed: int = 0) -> spm.SentencePieceProcessor:
    """Train BPE (or unigram) with byte fallback on already-NFC text; writes out_path (+ .vocab).

    With tokenizer.pretokenize=kiwi the sample is cut at morpheme boundaries first (data/morph.py); with
    pretokenize=jamo SentencePiece learns on the jamo view of the text (data/jamo.py).
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sentences = _sentences(texts, tcfg.max_sentence_length)
    extra = {}
    if tcfg.pretokenize == "kiwi":
        # Sample first: SentencePiece keeps only sample_sentences anyway, and Kiwi is too slow (~40k
        # characters/s per core) to analyse a whole corpus of many GB just to have most of it thrown away.
        sentences = _reservoir(sentences, tcfg.sample_sentences, seed)
        sentences = _marked(sentences, morph.Segmenter(protect=tuple(special_tokens(tcfg))))
        extra = dict(pretokenization_delimiter=morph.DELIMITER)
    elif tcfg.pretokenize == "jamo":
        protect = jamo.protect_pattern(special_tokens(tcfg))
        sentences = (jamo.decompose(s, protect) for s in sentences)
        # required_chars marks the model as a jamo one (load reads it back) and keeps the escape and every
        # compatibility letter in the alphabet even when the sample has few or none (a typo leaves such letters:
        # as bytes they cost three tokens each). A syllable is three characters now: pieces may be 3× longer.
        extra = dict(required_chars=jamo.FILLER + jamo.ESCAPE + jamo.LETTERS, max_sentencepiece_length=48)
    tmp = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_path.parent))
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
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
            max_sentence_length=tcfg.max_sentence_length * (12 if tcfg.pretokenize == "jamo" else 4),
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            # Chat-template markers become single pieces that encode and decode as their own text.
            user_defined_symbols=special_tokens(tcfg),
            num_threads=2,
            minloglevel=2,
            **extra,
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


def load(path: Path, threads: int = 0) -> spm.SentencePieceProcessor:
    """The tokenizer at `path`; a morpheme-aware one (trained with pretokenize=kiwi) segments as it encodes, a
    jamo one (pretokenize=jamo) decomposes as it encodes and recomposes as it decodes.

    `threads` bounds Kiwi's threads (0: one per core), for callers that already run one process per core.
    """
    if not Path(path).is_file():
        raise KslmError(f"tokenizer {path} not found; run `kslm tokenizer` for this workdir first")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise KslmError(f"tokenizer {path} is not a SentencePiece model ({e}); retrain it with `kslm tokenizer`") from None
    proto = model_proto(sp)
    if morph.is_morph_model(proto):
        return morph.MorphTokenizer(proto, threads, tuple(user_defined(sp, proto)))
    if jamo.is_jamo_model(proto):
        return jamo.JamoTokenizer(proto, tuple(user_defined(sp, proto)))
    return sp


def model_proto(sp: spm.SentencePieceProcessor):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def model_type(sp: spm.SentencePieceProcessor) -> str:
    from sentencepiece import sentencepiece_model_pb2
    kind = model_proto(sp).trainer_spec.model_type
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(kind).lower()


def pretokenize(sp: spm.SentencePieceProcessor) -> str:
    """"kiwi" for a morpheme-aware tokenizer, "jamo" for a jamo one, else "none" (what tokenizer.pretokenize was
    when it was trained)."""
    if isinstance(sp, jamo.JamoTokenizer):
        return "jamo"
    return "kiwi" if isinstance(sp, morph.MorphTokenizer) else "none"


def fertility(sp: spm.SentencePieceProcessor, texts: Iterable[str], batch: int = 1024) -> dict:
    """Tokens per character, per eojeol (space-separated word) and per UTF-8 byte; byte-fallback rate;
    the share of the vocabulary the text uses. Counts are of the original text, whatever view `sp` encodes."""
    docs = chars = words = nbytes = tokens = fallback = 0
    is_byte = np.asarray([sp.IsByte(i) for i in range(sp.GetPieceSize())], bool)
    used = np.zeros(sp.GetPieceSize(), bool)

    def count(chunk):
        nonlocal docs, chars, words, nbytes, tokens, fallback
        for text, ids in zip(chunk, sp.EncodeAsIds(chunk)):
            docs += 1
            chars += len(text)
            words += len(text.split())
            nbytes += len(text.encode("utf-8"))
            tokens += len(ids)
            fallback += int(is_byte[ids].sum())
            used[ids] = True

    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            count(chunk)
            chunk = []
    if chunk:
        count(chunk)
    if not tokens:
        return {}
    return dict(
        docs=docs,
        chars=chars,
        eojeols=words,
        tokens=tokens,
        tokens_per_char=tokens / max(chars, 1),
        tokens_per_word=tokens / max(words, 1),
        tokens_per_byte=tokens / max(nbytes, 1),
        byte_fallback_rate=fallback / tokens,
        vocab_used=float(used.mean()),
    )


_REPORT_ROWS = (("tokens per character", "tokens_per_char", "{:.4f}"),
                ("tokens per eojeol (space-separated word)", "tokens_per_word", "{:.4f}"),
                ("tokens per UTF-8 byte", "tokens_per_byte", "{:.4f}"),
                ("byte-fallback tokens", "byte_fallback_rate", "{:.3%}"),
                ("vocabulary used", "vocab_used", "{:.1%}"),
                ("documents", "docs", "{:,}"), ("characters", "chars", "{:,}"), ("eojeols", "eojeols", "{:,}"),
                ("tokens", "tokens", "{:,}"))


def format_report(report: dict) -> str:
    """The fertility report as a two-column table."""
    head = f"tokenizer: {report['pieces']:,} pieces, {report['model_type']}, pretokenize {report['pretokenize']}"
    rows = [(name, fmt.format(report[key])) for name, key, fmt in _REPORT_ROWS if key in report]
    width = max(len(n) for n, _ in rows)
    lines = [head, f"measured on {report['measured_on']}", ""]
    lines += [f"  {n:<{width}}  {v:>12}" for n, v in rows]
    return "\n".join(lines)


def check_workdir(cfg, workdir: Path):
    """The workdir's tokenizer, refused when it does not match the config's vocabulary size or pre-tokenization."""
    sp = load(workdir_lib.paths(workdir)["tokenizer"])
    if sp.GetPieceSize() != cfg.tokenizer.vocab_size:
        raise KslmError(f"tokenizer in {workdir} has {sp.GetPieceSize()} pieces but tokenizer.vocab_size="
                        f"{cfg.tokenizer.vocab_size}; retrain it with `kslm tokenizer`")
    if pretokenize(sp) != cfg.tokenizer.pretokenize:
        raise KslmError(f"tokenizer in {workdir} was trained with tokenizer.pretokenize={pretokenize(sp)} "
                        f"but the config says {cfg.tokenizer.pretokenize}; retrain it with `kslm tokenizer`, or set "
                        f"--config.tokenizer.pretokenize={pretokenize(sp)}")
    return sp
