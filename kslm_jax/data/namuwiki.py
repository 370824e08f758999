"""NamuWiki JSON dumps: one huge array of {"namespace", "title", "text", "contributors"}, namumark to prose.

The array is decoded one element at a time (jsonstream), never loaded whole. Every markup pass is a single
forward scan or a regex with bounded repetition, so a vandalized page cannot take quadratic time.
"""
from __future__ import annotations

import re
from typing import Iterator

from kslm_jax.data.jsonstream import iter_array
from kslm_jax.data.wikitext import MAX_LINK_DEPTH, replace_links

_MAIN = ("0", 0, "", None)  # the dumps write "0" for 일반 문서; 1 틀, 2 분류, 3 파일, 4 사용자, 6 나무위키 ...
_REDIRECT = ("#redirect", "#넘겨주기")
_BLOCK_TOKENS = re.compile(r"\{\{\{|\}\}\}")
_COLOR = re.compile(r"#(?:[0-9A-Za-z]+)(?:,\s*#?[0-9A-Za-z]+)?[ \n]")
_SIZE = re.compile(r"[+-][1-5] ")
_MACROS = re.compile(r"(?<!\[)\[(include|youtube|kakaotv|nicovideo|vimeo|navertv|age|dday|date|datetime|pagecount|"
                     r"anchor|math|목차|tableofcontents|각주|footnote|clearfix|br|ruby)(?:\(([^\[\]\n]{0,500})\))?\]",
                     re.IGNORECASE)
_FOOTNOTE_TOKENS = re.compile(r"\[\*|\[|\]")
_CELL = re.compile(r"\|\|(?:\s*<[^<>\n]{0,80}>)*")
_STRIKE = re.compile(r"~~[^\n]{0,500}?~~")
_KEEP_INNER = re.compile(r"__([^\n]{1,500}?)__|\^\^([^\n]{1,200}?)\^\^|,,([^\n]{1,200}?),,")
_QUOTES = re.compile(r"'{2,3}")
_DROP_LINK_NS = ("파일:", "분류:", "file:", "category:")
_LIST = re.compile(r"^\s*(?:\*|[1aAiI]\.(?:#\d+)?)\s*")


def _macro(m: re.Match) -> str:
    name = m.group(1).lower()
    if name == "br":
        return "\n"
    if name == "ruby":  # [ruby(글자, ruby=루비)] shows the base text
        return (m.group(2) or "").split(",", 1)[0].strip()
    return ""


def _block(inner: str) -> str:
    """{{{...}}}: #!html and #!syntax bodies are not prose; #!wiki/#!folding keep their body without the first
    line (style or title); #color and +size wrappers keep their text; anything else is literal text."""
    if inner.startswith(("#!html", "#!syntax")):
        return ""
    if inner.startswith("#!"):
        return inner.split("\n", 1)[1] if "\n" in inner else ""
    m = _COLOR.match(inner) or _SIZE.match(inner)
    return inner[m.end():] if m else inner


def _blocks(text: str) -> str:
    stack: list[list[str]] = [[]]
    pos = 0
    for m in _BLOCK_TOKENS.finditer(text):
        stack[-1].append(text[pos:m.start()])
        pos = m.end()
        if m.group() == "{{{" and len(stack) <= MAX_LINK_DEPTH:
            stack.append([])
        elif m.group() == "}}}" and len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(_block(inner))
        else:
            stack[-1].append(m.group())
    stack[-1].append(text[pos:])
    out = stack[0]
    for level in stack[1:]:
        out.append("{{{")
        out.extend(level)
    return "".join(out)


def _drop_footnotes(text: str) -> str:
    """[* note] and [*A note] with any brackets inside; an unclosed one stays text."""
    out, pos, depth, start = [], 0, 0, 0
    for m in _FOOTNOTE_TOKENS.finditer(text):
        tok = m.group()
        if not depth:
            if tok == "[*":
                out.append(text[pos:m.start()])
                start, depth = m.start(), 1
        elif tok == "]":
            depth -= 1
            if not depth:
                pos = m.end()
        else:
            depth += 1
    out.append(text[start:] if depth else text[pos:])
    return "".join(out)


def _namu_link(inner: str) -> str:
    target, pipe, label = inner.partition("|")
    t = target.strip()
    if t.lower().startswith(_DROP_LINK_NS):
        return ""
    if pipe and label.strip():
        return label
    if t.startswith(("http://", "https://")):
        return ""
    if t.startswith(":"):
        t = t[1:]
    return t.split("#", 1)[0] or t  # [[문서#s-1]] shows as the document's name


def _lines(text: str) -> str:
    out = []
    for line in text.split("\n"):
        if line.startswith("##"):  # a comment line
            continue
        s = line.strip()
        if len(s) >= 3 and s[0] == "=" and s[-1] == "=":
            s = s.strip("=").strip().strip("#").strip()  # == x == and folded ==# x #==
        elif s.startswith("||") or s.endswith("||"):
            s = " ".join(c.strip() for c in _CELL.split(s) if c.strip())
        elif s.startswith(">"):
            s = s.lstrip("> ")
        elif re.fullmatch(r"-{4,9}", s):
            s = ""
        else:
            s = _LIST.sub("", s, count=1)
        out.append(s)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def to_prose(text: str) -> str:
    text = _blocks(text)
    text = _MACROS.sub(_macro, text)
    text = _drop_footnotes(text)
    text = replace_links(text, _namu_link)
    text = _STRIKE.sub("", text)  # struck-out text is retracted, not prose
    text = _KEEP_INNER.sub(lambda m: m.group(1) or m.group(2) or m.group(3) or "", text)
    text = _QUOTES.sub("", text)
    return _lines(text)


def is_redirect(text: str) -> bool:
    return text.lstrip()[:10].lower().startswith(_REDIRECT)


def read_dump(chunks, max_chars: int, stats) -> Iterator[tuple[str, str, dict]]:
    for i, record in enumerate(iter_array(chunks, max_chars)):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats["missing_text_field"] += 1
        elif record.get("namespace") not in _MAIN:
            stats["other_namespace"] += 1
        elif is_redirect(text):
            stats["redirect"] += 1
        elif prose := to_prose(text):
            title = record.get("title")
            yield str(i), prose, {"title": title if isinstance(title, str) else ""}
        else:
            stats["markup_only"] += 1
