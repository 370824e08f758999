"""Normalization and scrubbing of Korean text, and the document filters; every rule counts what it touched."""
from __future__ import annotations

import collections
import html
import re
import unicodedata

# Only tag-shaped brackets: Korean legal text uses <개정 2010.1.1> style notes that are not markup.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,400})?/?>")


def _strip_comments(text: str) -> tuple[str, int]:
    """Remove <!-- ... --> in one forward pass (a lazy regex rescans from every unclosed opener)."""
    out, n, pos = [], 0, 0
    while (start := text.find("<!--", pos)) != -1:
        end = text.find("-->", start + 4)
        if end == -1:
            break  # an unclosed comment is left as text
        out.append(text[pos:start] + " ")
        pos, n = end + 3, n + 1
    out.append(text[pos:])
    return "".join(out), n
# ASCII-only bodies: a Korean particle written right after an address (…com으로) is not part of it.
_URL = re.compile(r"(?:https?://|www\.)[A-Za-z0-9\-._~:/?#@!$&*+,;=%]+", re.IGNORECASE)
# The lookbehind starts a match only where a run of address characters starts: without it a long run with no
# @ (base64, hex) is rescanned from every position, quadratic time.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def is_hangul(ch: str) -> bool:
    o = ord(ch)
    return (0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F
            or 0xA960 <= o <= 0xA97F or 0xD7B0 <= o <= 0xD7FF)


def hangul_ratio(text: str) -> float:
    """Hangul syllables and jamo over all non-space characters (Hanja, Latin and digits count against)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(map(is_hangul, chars)) / len(chars)


def clean_text(text: str, cfg, stats: collections.Counter) -> str:
    # NFC, never NFKC: NFKC rewrites compatibility jamo (ㅋ) into conjoining jamo and breaks the text.
    out = unicodedata.normalize("NFC", text)
    if "<" in out:
        out, comments = _strip_comments(out)
        out, n = _TAG.subn(" ", out)
        stats["html_tags"] += n + comments
    if "&" in out:
        unescaped = html.unescape(out)
        if unescaped != out:
            stats["html_entities"] += 1
            out = unicodedata.normalize("NFC", unescaped)
    # E-mails first: an address at a www. host would otherwise be half-eaten by the URL rule.
    if cfg.replace_emails:
        out, n = _EMAIL.subn("[EMAIL]", out)
        stats["emails"] += n
    if cfg.replace_urls:
        out, n = _URL.subn("[URL]", out)
        stats["urls"] += n
    out, n = _CONTROL.subn("", out)
    stats["control_chars"] += n
    if n:  # a removed character may have separated jamo or a base and its mark that NFC composes
        out = unicodedata.normalize("NFC", out)
    lines = [_SPACES.sub(" ", line).strip() for line in out.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def rejection(text: str, cfg) -> str | None:
    """The name of the first filter that drops `text`, or None to keep it."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if hangul_ratio(text) < cfg.min_hangul_ratio:
        return "low_hangul_ratio"
    return None
