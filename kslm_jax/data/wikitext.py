"""Wikipedia XML dumps (`*-pages-articles*.xml[.bz2]`): streamed pages of the main namespace, wikitext to prose.

Every pass is one forward scan: dumps hold adversarial edits, and a lazy regex that rescans from each unclosed
opener turns one vandalized page into minutes.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Callable, Iterator

from kslm_jax.data.rawio import BadFile, RawReader

MAX_LINK_DEPTH = 8  # deeper [[ are text: real links nest at most a caption inside a file link
_DROP_LINK_NS = {"file", "image", "media", "category", "파일", "그림", "이미지", "미디어", "분류"}
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*")
_BRACES = re.compile(r"\{\{+|\}\}+")
_LINK_TOKENS = re.compile(r"\[\[|\]\]")
# A label holds no brackets: each failed match then stops at the next "[" instead of scanning 1000 characters.
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\[\]]+(?:[ \t]+([^\[\]\n]{0,1000}))?\]")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]{2,30}__")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Blocks whose content is not prose; <ref> is a footnote. The opener pattern is bounded, so it cannot backtrack.
_DROP_BLOCKS = ("ref", "references", "gallery", "math", "chem", "syntaxhighlight", "source", "score", "timeline",
                "imagemap", "graph", "mapframe", "templatedata", "includeonly")
_BLOCK_OPEN = re.compile(r"<(" + "|".join(_DROP_BLOCKS) + r")\b[^<>]{0,500}?(/?)>", re.IGNORECASE)
_INLINE_TAGS = re.compile(r"</?(?:small|big|sup|sub|span|div|center|u|s|b|i|em|strong|font|abbr|poem|blockquote|p|"
                          r"nowiki|onlyinclude|noinclude|code|tt|var|mark|ins|del|q|cite)\b[^<>]{0,300}>",
                          re.IGNORECASE)


def strip_comments(text: str) -> str:
    """<!-- ... --> out; an unclosed comment hides the rest of the page, as MediaWiki renders it."""
    out, pos = [], 0
    while (start := text.find("<!--", pos)) != -1:
        out.append(text[pos:start])
        end = text.find("-->", start + 4)
        if end == -1:
            return "".join(out)
        pos = end + 3
    out.append(text[pos:])
    return "".join(out)


def _drop_blocks(text: str) -> str:
    out, pos = [], 0
    no_closer_after: dict[str, int] = {}  # tag → position from which no closer exists (keeps it linear)
    for m in _BLOCK_OPEN.finditer(text):
        if m.start() < pos:
            continue
        out.append(text[pos:m.start()])
        pos = m.end()
        name = m.group(1).lower()
        if m.group(2) or no_closer_after.get(name, len(text) + 1) <= m.end():
            continue
        close = re.compile(rf"</{name}\s*>", re.IGNORECASE).search(text, m.end())
        if close is None:
            no_closer_after[name] = m.end()
        else:
            pos = close.end()
    out.append(text[pos:])
    return "".join(out)


def drop_nested(text: str) -> str:
    """Remove balanced {{ ... }} (templates, parser functions, {{{params}}}) however deeply nested.

    Brace runs count in pairs: `}}}}}}` closes three templates, `{{{p}}}` is one parameter.
    """
    out, depth, pos, opened = [], 0, 0, 0
    for m in _BRACES.finditer(text):
        pairs = (m.end() - m.start()) // 2
        if m.group()[0] == "{":
            if depth == 0:
                out.append(text[pos:m.start()])
                opened = m.start()
            depth += pairs
        elif depth:
            depth = max(0, depth - pairs)
            if depth == 0:
                pos = m.end()
    out.append(text[opened:] if depth else text[pos:])  # an unclosed opener stays text
    return "".join(out)


def _drop_tables(text: str) -> str:
    keep, depth = [], 0
    for line in text.split("\n"):
        head = line.lstrip()
        if head.startswith("{|"):
            depth += 1
        elif depth and head.startswith("|}"):
            depth -= 1
        elif not depth:
            keep.append(line)
    return "\n".join(keep)


def replace_links(text: str, render: Callable[[str], str]) -> str:
    """Every [[...]] (innermost first) replaced by render(inside); unmatched brackets stay text."""
    stack: list[list[str]] = [[]]
    pos = 0
    for m in _LINK_TOKENS.finditer(text):
        stack[-1].append(text[pos:m.start()])
        pos = m.end()
        if m.group() == "[[" and len(stack) <= MAX_LINK_DEPTH:
            stack.append([])
        elif m.group() == "]]" and len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(render(inner))
        else:
            stack[-1].append(m.group())
    stack[-1].append(text[pos:])
    out = stack[0]
    for level in stack[1:]:
        out.append("[[")
        out.extend(level)
    return "".join(out)


def _wiki_link(inner: str) -> str:
    target, pipe, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:분류:x]] links to the page instead of filing this one
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip()
        # interlanguage links ([[en:Seoul]]) are lowercase codes as written; [[MBC: 뉴스]] is a page
        if prefix.lower() in _DROP_LINK_NS or (_INTERLANGUAGE.fullmatch(prefix) and not pipe):
            return ""
    if pipe and label.strip():
        return label
    return target


def _lines(text: str) -> str:
    out = []
    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= 3 and s[0] == "=" and s[-1] == "=":
            s = s.strip("=").strip()
        elif s[:1] in ("*", "#", ":", ";"):
            s = s.lstrip("*#:; ")
        elif s.startswith("----"):
            s = ""
        out.append(s)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def to_prose(text: str) -> str:
    text = strip_comments(text)
    text = _drop_blocks(text)
    text = drop_nested(text)
    text = _drop_tables(text)
    text = replace_links(text, _wiki_link)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = _BR.sub("\n", text)
    text = _INLINE_TAGS.sub("", text)
    return _lines(text)


# ---------------------------------------------------------------------------------------------- XML dump

def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _page(elem) -> tuple[str, str, str, bool, str | None]:
    """(id, title, namespace, is_redirect, text of the last revision)."""
    pid = title = ns = ""
    redirect, text = False, None
    for child in elem:
        tag = _local(child.tag)
        if tag == "title":
            title = child.text or ""
        elif tag == "ns":
            ns = (child.text or "").strip()
        elif tag == "id":
            pid = (child.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "revision":
            for part in child:
                if _local(part.tag) == "text":
                    text = part.text or ""
    return pid, title, ns, redirect, text


class _Replay:
    """The first bytes again, then the rest: the empty-file check must not consume what the parser needs."""

    def __init__(self, head: bytes, raw: RawReader):
        self._head, self._raw = head, raw

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head, b""
            return out
        return self._raw.read(n)


def read_dump(raw: RawReader, max_chars: int, stats) -> Iterator[tuple[str, str, dict]]:
    """Main-namespace articles as prose, one per page; redirects and other namespaces are counted."""
    head = raw.read(1 << 16)
    if not head.strip():
        raise BadFile("empty")
    root = None
    pages = 0
    try:
        for event, elem in ET.iterparse(_Replay(head, raw), events=("start", "end")):
            if root is None:
                root = elem
            if event != "end" or _local(elem.tag) != "page":
                continue
            pages += 1
            pid, title, ns, redirect, text = _page(elem)
            root.clear()  # the page is done: drop it and everything before it
            if ns not in ("0", ""):
                stats["other_namespace"] += 1
            elif redirect or (text or "").lstrip().lower().startswith(("#redirect", "#넘겨주기")):
                stats["redirect"] += 1
            elif text is None:
                stats["missing_text_field"] += 1
            elif len(text) > max_chars:
                stats["record_too_long"] += 1
            elif prose := to_prose(text):
                yield pid or str(pages), prose, {"title": title}
            else:
                stats["markup_only"] += 1
    except ET.ParseError as e:
        raise BadFile("truncated" if "no element found" in str(e) else "bad_xml", str(e)) from None
    if root is not None and not pages:
        raise BadFile("no_pages", "an XML file without MediaWiki <page> elements")
