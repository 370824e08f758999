"""Every config key with its value and its help text, for `kslm config --show`.

The help of a key is the trailing comment beside it in config_schema.base_config(), and the comment lines that
continue it. They are read from that file with `tokenize`, so the schema stays the one place a key is described:
a comment added there shows up here without a second table to keep in step.
"""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

from kslm_jax.core import config_schema


def schema_comments() -> dict[str, str]:
    """{"section.key": comment} for the keys of base_config() that have one."""
    source = Path(config_schema.__file__).read_text(encoding="utf-8")
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    start = next(i for i, t in enumerate(tokens) if t.type == tokenize.NAME and t.string == "base_config")
    comments: dict[str, str] = {}
    sections: list[tuple[str, int]] = []  # (name, paren depth of its dict call)
    depth, key, key_line = 0, None, -1
    for i in range(start, len(tokens)):
        t = tokens[i]
        if t.type == tokenize.NAME and t.string == "lock":  # c.lock(): the schema ends here
            break
        if t.type == tokenize.OP and t.string == "(":
            depth += 1
        elif t.type == tokenize.OP and t.string == ")":
            if sections and sections[-1][1] == depth:
                sections.pop()
            depth -= 1
        elif t.type == tokenize.NAME and _is_assignment(tokens, i):
            if _opens_dict(tokens, i):  # `c.model = dict(` or `dedup=dict(`: a section begins
                sections.append((t.string, depth + 1))
                key = None
            elif sections and depth == sections[-1][1]:
                key, key_line = ".".join(n for n, _ in sections) + "." + t.string, t.start[0]
        elif t.type == tokenize.COMMENT and key is not None:
            text = t.string.lstrip("#").strip()
            if t.start[0] == key_line:
                comments[key] = text
            elif key in comments and _alone_on_line(tokens, i):  # a comment continued on the next line
                comments[key] += " " + text
    return comments


def _is_assignment(tokens, i) -> bool:
    nxt = _next_significant(tokens, i)
    return nxt is not None and tokens[nxt].type == tokenize.OP and tokens[nxt].string == "="


def _opens_dict(tokens, i) -> bool:
    eq = _next_significant(tokens, i)
    call = _next_significant(tokens, eq)
    paren = _next_significant(tokens, call)
    return (call is not None and tokens[call].string == "dict" and paren is not None
            and tokens[paren].string == "(")


def _next_significant(tokens, i):
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    for j in range(i + 1, len(tokens)):
        if tokens[j].type not in skip:
            return j
    return None


def _alone_on_line(tokens, i) -> bool:
    line = tokens[i].start[0]
    return all(t.start[0] != line or t.type in (tokenize.COMMENT, tokenize.NL) for t in tokens[max(0, i - 3):i])


def format_config(flat_values: dict, width: int = 120) -> str:
    """One line a key: `section.key = value  # help`, sections separated by a blank line."""
    comments = schema_comments()
    lines, section = [], None
    pad = max(len(k) for k in flat_values)
    for key, value in flat_values.items():
        head = key.split(".", 1)[0]
        if section is not None and head != section:
            lines.append("")
        section = head
        line = f"{key:<{pad}} = {value!r}"
        if key in comments:
            line += f"  # {comments[key]}"
        lines.append(line)
    return "\n".join(lines)
