"""Normalization and scrubbing of Korean text. Each edit rule reports the documents and characters it touched.

The document filters live in filters.py; FILTERS, `hangul_ratio`, `is_hangul` and `rejection` are re-exported here
because callers think of them as part of cleaning.
"""
from __future__ import annotations

import collections
import dataclasses
import html
import re
import unicodedata
from typing import NamedTuple

from kslm_jax.data.filters import FILTERS, PLACEHOLDERS, FilterSettings, hangul_ratio, is_hangul, rejection  # noqa: F401

# PII rule → its `data` config key (replace by a placeholder | drop the document | keep), in the order they run
ACTION_KEYS = {"emails": "email_action", "urls": "url_action", "rrns": "rrn_action", "cards": "card_action",
               "phones": "phone_action"}
EDIT_RULES = ("nfc", "html_tags", "html_entities", "control_chars", "emails", "urls", "rrns", "cards", "phones",
              "repeated_chars", "whitespace")

# Only tag-shaped brackets: Korean legal text uses <개정 2010.1.1> style notes that are not markup, and the
# <URL> placeholder must survive a second cleaning pass.
_TAG = re.compile(r"</?(?!URL>)[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,400})?/?>")
_ENTITY = re.compile(r"&(?:#[0-9]{1,8}|#[xX][0-9a-fA-F]{1,8}|[A-Za-z][A-Za-z0-9]{1,31});?")
# ASCII-only bodies: a Korean particle written right after an address (…com으로) is not part of it.
_URL = re.compile(r"(?:https?://|www\.)[A-Za-z0-9\-._~:/?#@!$&*+,;=%]+", re.IGNORECASE)
# The lookbehind starts a match only where a run of address characters starts: without it a long run with no
# @ (base64, hex) is rescanned from every position, quadratic time.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# The three number rules match ASCII digits only (re.ASCII).
# Resident (and foreign-resident, 5-8) registration numbers: a valid YYMMDD, a hyphen, seven digits. Without
# the hyphen a 13-digit run is as often a barcode (Korean EAN-13 codes start 880…) as a person.
_RRN = re.compile(r"(?<!\d)(?<!\d-)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-[1-8]\d{6}(?!-?\d)", re.ASCII)
# Four groups of four digits with one separator throughout; the neighbors may not continue the number.
_CARD = re.compile(r"(?<!\d)(?<!\d[- ])(\d{4})([- ])(\d{4})\2(\d{4})\2(\d{4})(?![- ]?\d)", re.ASCII)
# Mobile (01X, separators optional), Seoul 02, area codes 031-064 and internet 070 (separators required:
# bare 9-11 digit runs are ids and amounts more often than phones); +82 replaces the leading 0.
_PHONE = re.compile(
    r"(?<![\d+])(?<!\d[-. ])(?:"
    r"(?:\+82[-. ]?|0)1[016789]([-. ]?)\d{3,4}\1\d{4}"
    r"|(?:\+82[-. ]?|0)(?:2|[3-6][1-5]|70)([-. ])\d{3,4}\2\d{4}"
    r")(?![-. ]?\d)", re.ASCII)
# Every phone, card and registration number has a run of four digits; most documents have none.
_FOUR_DIGITS = re.compile(r"\d{4}")
_URL_HINT = re.compile(r"://|www\.", re.IGNORECASE)
_NEEDS = {"emails": lambda t: "@" in t, "urls": _URL_HINT.search}  # the number rules: _FOUR_DIGITS
# Whitespace that the normalization below would change; most documents have none.
_UNTIDY = re.compile(r"[\t\u00a0\u3000\r]|  |^\s|\s$|[^\S\n]\n|\n[^\S\n]|\n\n\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANKS = re.compile(r"\n{3,}")
_EXAMPLE_CHARS = 40
_SHOWN = {"emails": 3, "urls": 3, "rrns": 0, "cards": 3, "phones": 3}  # unmasked leading characters (a birth date: none)


@dataclasses.dataclass(frozen=True)
class CleanSettings:
    """The `data` config keys cleaning reads, as plain values a worker process can be given."""
    email_action: str
    url_action: str
    rrn_action: str
    card_action: str
    phone_action: str
    max_repeat: int
    filters: FilterSettings

    @classmethod
    def from_config(cls, dcfg) -> "CleanSettings":
        return cls(**{f.name: dcfg[f.name] for f in dataclasses.fields(cls) if f.name != "filters"},
                   filters=FilterSettings.from_config(dcfg))


class Touch(NamedTuple):
    """What one rule did to one document: matches, characters removed or replaced, a few (masked) examples."""
    rule: str
    count: int
    chars: int
    examples: tuple


def short(s: str) -> str:
    s = s.replace("\n", "⏎")
    return s if len(s) <= _EXAMPLE_CHARS else s[:_EXAMPLE_CHARS - 1] + "…"


def mask(s: str, keep: int = 3) -> str:
    """A PII example for the report: its shape (separators, length) and the first `keep` characters (a phone
    prefix, a card issuer), never the personal part."""
    return short(s[:keep] + re.sub(r"[A-Za-z0-9]", "*", s[keep:]))


def _strip_comments(text: str) -> tuple[str, int, list]:
    """Remove <!-- ... --> in one forward pass (a lazy regex rescans from every unclosed opener)."""
    out, n, pos, removed = [], 0, 0, []
    while (start := text.find("<!--", pos)) != -1:
        end = text.find("-->", start + 4)
        if end == -1:
            break  # an unclosed comment is left as text
        out.append(text[pos:start] + " ")
        removed.append(text[start:end + 3])
        pos, n = end + 3, n + 1
    out.append(text[pos:])
    return "".join(out), n, removed


def _cap_runs(max_repeat: int):
    # Digits are never capped: 1000000원 and 2000년 are amounts and years, not emphasis.
    return re.compile(r"([^\d\s])\1{%d,}" % max_repeat) if max_repeat > 0 else None


class Cleaner:
    """NFC → HTML → control characters → e-mails, URLs, registration, card and phone numbers → repeated
    characters → whitespace.

    `clean` returns the cleaned text, the rule that drops the document (a PII rule set to "drop") or None,
    and one Touch per rule that changed something.
    """

    def __init__(self, settings: CleanSettings):
        self.settings = settings
        self._cap = _cap_runs(settings.max_repeat)
        patterns = {"emails": _EMAIL, "urls": _URL, "rrns": _RRN, "cards": _CARD, "phones": _PHONE}
        self._pii = [(rule, patterns[rule], getattr(settings, key)) for rule, key in ACTION_KEYS.items()]

    def clean(self, text: str) -> tuple[str, str | None, list[Touch]]:
        touched: list[Touch] = []
        # NFC, never NFKC: NFKC rewrites compatibility jamo (ㅋ) into conjoining jamo and breaks the text.
        if not unicodedata.is_normalized("NFC", text):
            out = unicodedata.normalize("NFC", text)
            touched.append(Touch("nfc", 1, len(text) - len(out), ()))
            text = out
        if "<" in text:
            text, n_comments, comments = _strip_comments(text)
            tags: list[str] = []
            text, n = _TAG.subn(lambda m: tags.append(m.group()) or " ", text)
            if n + n_comments:
                found = comments + tags
                touched.append(Touch("html_tags", n + n_comments, sum(map(len, found)),
                                     tuple(short(t) for t in found[:3])))
        if "&" in text:
            unescaped = html.unescape(text)
            if unescaped != text:
                examples = tuple(short(m.group()) for m, _ in zip(_ENTITY.finditer(text), range(3)))
                out = unicodedata.normalize("NFC", unescaped)
                touched.append(Touch("html_entities", 1, len(text) - len(out), examples))
                text = out
        text, n = _CONTROL.subn("", text)
        if n:  # a removed character may have separated jamo or a base and its mark that NFC composes
            touched.append(Touch("control_chars", n, n, ()))
            text = unicodedata.normalize("NFC", text)
        # E-mails before URLs: an address at a www. host would otherwise be half-eaten by the URL rule.
        drop, digits = None, _FOUR_DIGITS.search(text)
        for rule, rx, action in self._pii:
            if action == "keep" or not (_NEEDS[rule](text) if rule in _NEEDS else digits):
                continue
            if action == "drop":
                if drop is None:
                    m = next((m for m in rx.finditer(text) if rule != "cards" or _card_like(m)), None)
                    if m:  # the rest still runs, so that even a dropped document comes out well-formed
                        drop = rule
                        touched.append(Touch(rule, 1, len(text), (mask(m.group(), _SHOWN[rule]),)))
                continue
            found: list[str] = []
            text = rx.sub(self._replacer(rule, found), text)
            if found:
                touched.append(Touch(rule, len(found), sum(map(len, found)),
                                     tuple(mask(f, _SHOWN[rule]) for f in found[:3])))
        if self._cap is not None and self._cap.search(text):
            cap = self.settings.max_repeat
            found = []
            text = self._cap.sub(lambda m: found.append(m.group()) or m.group(1) * cap, text)
            touched.append(Touch("repeated_chars", len(found), sum(len(r) - cap for r in found),
                                 tuple(short(r) for r in found[:3])))
        if not _UNTIDY.search(text):
            return text, drop, touched
        lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        out = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
        if out != text:
            touched.append(Touch("whitespace", 1, len(text) - len(out), ()))
        return out, drop, touched

    @staticmethod
    def _replacer(rule: str, found: list):
        token = PLACEHOLDERS[rule]
        if rule != "cards":
            return lambda m: found.append(m.group()) or token

        def card(m):
            if not _card_like(m):
                return m.group()
            found.append(m.group())
            return token
        return card


def _card_like(m: re.Match) -> bool:
    # Four years in a row (2019 2020 2021 2022) has the shape of a card number; a card number is never that.
    return not all(1900 <= int(m.group(g)) <= 2099 for g in (1, 3, 4, 5))


def clean_text(text: str, cfg, stats: collections.Counter) -> str:
    """The cleaned text alone (whether a PII rule set to "drop" rejects it is not returned); `stats` counts
    matches per rule."""
    settings = cfg if isinstance(cfg, CleanSettings) else CleanSettings.from_config(cfg)
    out, _, touched = Cleaner(settings).clean(text)
    for t in touched:
        stats[t.rule] += t.count
    return out
