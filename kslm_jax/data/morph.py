"""Morpheme-aware pre-tokenization with Kiwi: no SentencePiece piece crosses a morpheme boundary in an eojeol.

Korean glues particles and endings onto stems (밥을, 먹었다), so plain BPE learns pieces like "을▁먹" or
"화는" that straddle grammar. Here Kiwi finds the morphemes and the text is *cut* at their start offsets
inside each eojeol; it is never rewritten (Kiwi's lemmas such as 쓰+었 for 썼 are ignored), so the pieces of
the parts join back to the original string and decode(encode(x)) == x holds as for the plain tokenizer.

Training marks the cuts with DELIMITER, which SentencePiece's `pretokenization_delimiter` treats as a word
boundary and removes. The trained model keeps that setting in its trainer spec, which is how `load` knows
to segment at encode time: SentencePiece itself only applies the delimiter while training.
"""
from __future__ import annotations

import functools
import os
import re

import sentencepiece as spm

from kslm_jax.core.errors import KslmError

# INVISIBLE SEPARATOR: rare in real text, and stripped from the training sample before cuts are marked.
DELIMITER = "\u2063"
# Kiwi's cost grows with the input; long lines are analysed in pieces cut at whitespace.
_CHUNK_CHARS = 2000


@functools.cache
def _kiwi(threads: int):
    """One Kiwi per thread count and process: loading its model takes about 1.5 s on 2 cores, and every
    Segmenter (each loaded kiwi tokenizer, the tokenizer trainer's) would otherwise load its own. Its analyses do
    not depend on which instance gives them."""
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise KslmError("tokenizer.pretokenize=kiwi needs kiwipiepy: pip install 'kslm_jax[morph]' "
                        "(or pip install kiwipiepy)") from None
    # The typo and multi-word dictionaries change no boundary we use and cost ~15% of the speed.
    return Kiwi(num_workers=max(1, threads), load_typo_dict=False, load_multi_dict=False)


def _chunks(text: str):
    """(offset, piece) with pieces of at most _CHUNK_CHARS, cut after whitespace where there is any."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        end = start + _CHUNK_CHARS
        ws = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        end = ws + 1 if ws > start else end
        yield start, text[start:end]
        start = end
    yield start, text[start:]


class Segmenter:
    """Cut offsets of morpheme starts inside eojeols; Kiwi is loaded on first use (about 1.5 s, ~100 MB).

    `protect`: strings never cut inside (the special tokens, e.g. <|user|>, which must stay one piece).
    """

    def __init__(self, threads: int = 0, protect: tuple[str, ...] = ()):
        self.threads = threads or os.cpu_count() or 1
        self._kiwi = None
        self._protect = re.compile("|".join(map(re.escape, sorted(protect, key=len, reverse=True)))) if protect else None

    def cuts(self, texts: list[str]) -> list[list[int]]:
        if self._kiwi is None:
            self._kiwi = _kiwi(self.threads)
        owners, pieces = [], []
        for i, text in enumerate(texts):
            for off, piece in _chunks(text):
                owners.append((i, off))
                pieces.append(piece)
        found: list[set[int]] = [set() for _ in texts]
        for (i, off), tokens in zip(owners, self._kiwi.tokenize(pieces, split_complex=False)):
            found[i].add(off)  # a chunk cut inside an eojeol is a boundary too
            found[i].update(off + t.start for t in tokens)
        out = []
        for text, cand in zip(texts, found):
            if self._protect:
                for m in self._protect.finditer(text):
                    cand.difference_update(range(m.start() + 1, m.end()))
            # Only boundaries inside an eojeol: SentencePiece already splits at whitespace.
            out.append(sorted(p for p in cand if 0 < p < len(text)
                              and not text[p - 1].isspace() and not text[p].isspace()))
        return out

    def mark(self, texts: list[str]) -> list[str]:
        """The training view: DELIMITER at every cut (and nowhere else)."""
        texts = [t.replace(DELIMITER, "") for t in texts]
        return [_join(t, c, DELIMITER) for t, c in zip(texts, self.cuts(texts))]


def _join(text: str, cuts: list[int], sep: str) -> str:
    return sep.join(_parts(text, cuts))


def _parts(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def is_morph_model(proto) -> bool:
    return proto.trainer_spec.pretokenization_delimiter == DELIMITER


class MorphTokenizer(spm.SentencePieceProcessor):
    """A SentencePieceProcessor whose Encode cuts text at morpheme boundaries first.

    The first part of a text is encoded as SentencePiece would the whole text (with its dummy "▁" prefix);
    later parts by a twin model without that prefix, so a part that starts mid-eojeol gets no "▁" while one
    that starts after a space gets it from the space. Decoding is SentencePiece's own.
    """

    def __init__(self, proto, threads: int = 0, protect: tuple[str, ...] = ()):
        """`proto`: the parsed ModelProto; `protect`: its special tokens, which no cut may split."""
        super().__init__(model_proto=proto.SerializeToString())
        twin = type(proto)()
        twin.CopyFrom(proto)
        twin.normalizer_spec.add_dummy_prefix = False
        self._inner = spm.SentencePieceProcessor(model_proto=twin.SerializeToString())
        self._segmenter = Segmenter(threads, protect)

    def Encode(self, input, out_type=int, **kwargs):  # noqa: N802 (SentencePiece's name)
        if kwargs.get("add_bos") or kwargs.get("add_eos") or kwargs.get("enable_sampling"):
            raise TypeError("MorphTokenizer.Encode takes no add_bos/add_eos/enable_sampling; add BOS/EOS yourself")
        single = isinstance(input, str)
        texts = [input] if single else list(input)
        parts = [_parts(t, c) for t, c in zip(texts, self._segmenter.cuts(texts))]
        firsts = super().Encode([p[0] for p in parts], out_type=out_type)
        rest = [q for p in parts for q in p[1:]]
        rest_enc = iter(self._inner.Encode(rest, out_type=out_type) if rest else [])
        out = []
        for p, first in zip(parts, firsts):
            ids = list(first)
            for _ in p[1:]:
                ids.extend(next(rest_enc))
            out.append(ids)
        return out[0] if single else out

    encode = Encode

    def EncodeAsIds(self, input, **kwargs):  # noqa: N802
        return self.Encode(input, out_type=int, **kwargs)

    def EncodeAsPieces(self, input, **kwargs):  # noqa: N802
        return self.Encode(input, out_type=str, **kwargs)
