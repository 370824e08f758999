"""Document filters on cleaned text: length, Hangul ratio, symbol ratio, duplicate lines, repeated eojeol n-grams.

Character classes come from a lookup table over code points, counted with NumPy for a whole chunk of
documents at once: a regex character class costs ~0.1 µs per character, which at corpus scale was as much as
all the cleaning rules together.
"""
from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

# Cheapest first: a 200 MB line is rejected by its length before any ratio is computed.
FILTERS = ("too_short", "too_long", "low_hangul_ratio", "high_symbol_ratio", "duplicate_lines", "repeated_ngrams")
# What the PII rules put in place of a match. Filters do not see them: "<이메일>" alone is not Korean text.
PLACEHOLDERS = {"emails": "<이메일>", "urls": "<URL>", "rrns": "<주민번호>", "cards": "<카드번호>", "phones": "<전화번호>"}
_PLACEHOLDER = re.compile("|".join(map(re.escape, PLACEHOLDERS.values())))
HANGUL, SPACE, WORD = 1, 2, 4  # WORD: str.isalnum(), which is what regex \w means, less the underscore
_HANGUL_RANGES = ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF))


def _bmp_table() -> np.ndarray:
    chars = [chr(i) for i in range(0x10000)]
    table = (np.fromiter(map(str.isalnum, chars), bool, 0x10000) * WORD
             + np.fromiter(map(str.isspace, chars), bool, 0x10000) * SPACE).astype(np.uint8)
    for lo, hi in _HANGUL_RANGES:
        table[lo:hi + 1] |= HANGUL
    return table


_BMP = _bmp_table()


def char_classes(cps: np.ndarray) -> np.ndarray:
    """HANGUL | SPACE | WORD bits of each code point (Hangul is all in the BMP; emoji and rare scripts above
    it are looked up one distinct character at a time)."""
    out = _BMP[np.minimum(cps, 0xFFFF)]
    astral = cps > 0xFFFF
    if astral.any():
        uniq, inverse = np.unique(cps[astral], return_inverse=True)
        out[astral] = np.array([WORD * chr(c).isalnum() + SPACE * chr(c).isspace() for c in uniq.tolist()],
                               np.uint8)[inverse]
    return out


def codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one uint32 code point array, and the offsets where each starts (plus the end)."""
    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    return cps, np.concatenate([[0], np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)))])


def per_text(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How many flags are set inside each text (empty texts included)."""
    c = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return c[offsets[1:]] - c[offsets[:-1]]


@dataclasses.dataclass(frozen=True)
class FilterSettings:
    """The `data` config keys the filters read (defaults and meanings: config.py)."""
    min_chars: int
    max_chars: int
    min_hangul_ratio: float
    max_symbol_ratio: float
    max_dup_line_ratio: float
    max_top_2gram_ratio: float
    max_top_3gram_ratio: float
    max_top_4gram_ratio: float

    @classmethod
    def from_config(cls, dcfg) -> "FilterSettings":
        return cls(**{f.name: dcfg[f.name] for f in dataclasses.fields(cls)})


def is_hangul(ch: str) -> bool:
    return bool(_BMP[ord(ch)] & HANGUL) if ord(ch) < 0x10000 else False


def _ratios(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hangul and symbol (neither letter, digit nor space) characters over non-space characters."""
    cps, offsets = codepoints(texts)
    cls = char_classes(cps)
    non_space = np.diff(offsets) - per_text((cls & SPACE) != 0, offsets)
    hangul = per_text((cls & HANGUL) != 0, offsets)
    symbol = non_space - per_text((cls & WORD) != 0, offsets)
    denominator = np.maximum(non_space, 1)
    return hangul / denominator, symbol / denominator


def hangul_ratio(text: str) -> float:
    """Hangul syllables and jamo over all non-space characters (Hanja, Latin and digits count against)."""
    return float(_ratios([text])[0][0])


def symbol_ratio(text: str) -> float:
    """Punctuation and symbols over non-space characters."""
    return float(_ratios([text])[1][0])


def duplicate_line_ratio(text: str) -> float:
    """Characters in lines that repeat an earlier line of the document, over all line characters."""
    if "\n" not in text:
        return 0.0
    seen, dup, total = set(), 0, 0
    for line in text.split("\n"):
        if not line:
            continue
        total += len(line)
        if line in seen:
            dup += len(line)
        seen.add(line)
    return dup / total if total else 0.0


def top_ngram_ratio(words: list[str], n: int) -> float:
    """Characters in the repeats of the most frequent eojeol n-gram (every occurrence after the first), over
    all word characters. Gopher counts the first occurrence too, which in a 10-word review makes one
    repeated pair of words look like spam; here a document with no repeats scores 0."""
    if len(words) < n + 1:
        return 0.0
    grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    covered, first = [False] * len(words), None  # overlapping occurrences (ㅋ ㅋ ㅋ ㅋ) count a word once
    for i in range(len(words) - n + 1):
        if tuple(words[i:i + n]) == gram:
            if first is None:
                first = i
            covered[i:i + n] = [True] * n
    covered[first:first + n] = [False] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


def rejections(texts: list[str], cfg) -> list[str | None]:
    """For each text the name of the first filter that drops it, or None to keep it."""
    texts = [_PLACEHOLDER.sub("", t) if "<" in t else t for t in texts]
    out = [_by_length(t, cfg) for t in texts]
    rest = [i for i, reason in enumerate(out) if reason is None]  # a 200 MB text never reaches the ratios
    hangul, symbol = _ratios([texts[i] for i in rest])
    for i, h, s in zip(rest, hangul.tolist(), symbol.tolist()):
        out[i] = _by_content(texts[i], h, s, cfg)
    return out


def rejection(text: str, cfg) -> str | None:
    """`rejections` for one text. `cfg`: FilterSettings or the `data` config section."""
    return rejections([text], cfg)[0]


def _by_length(text: str, cfg) -> str | None:
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    return None


def _by_content(text: str, hangul: float, symbol: float, cfg) -> str | None:
    if hangul < cfg.min_hangul_ratio:
        return "low_hangul_ratio"
    if symbol > cfg.max_symbol_ratio:
        return "high_symbol_ratio"
    if duplicate_line_ratio(text) > cfg.max_dup_line_ratio:
        return "duplicate_lines"
    words = text.split()
    if len(set(words)) < len(words):  # no word repeats, so no n-gram does either
        for n, limit in ((2, cfg.max_top_2gram_ratio), (3, cfg.max_top_3gram_ratio), (4, cfg.max_top_4gram_ratio)):
            if top_ngram_ratio(words, n) > limit:
                return "repeated_ngrams"
    return None
