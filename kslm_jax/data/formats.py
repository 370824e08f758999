"""Readers for the record formats: plain text, JSON lines, whole-file JSON, CSV/TSV and Parquet.

Each takes a stream of decoded text (Parquet: the raw file), yields (id suffix, text, extra meta) and counts
what it skips in `stats`. Damage that ends a file raises rawio.BadFile.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import json
import re
import tempfile
from typing import Iterator

from kslm_jax.data import rawio
from kslm_jax.data.jsonstream import iter_array
from kslm_jax.data.rawio import BadFile

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PARAGRAPH_BLANK = " \t\u3000"
Record = tuple[str, str, dict]


def field(record, dotted: str, spread: bool = False):
    """The value at a dotted path; with `spread`, a list met on the way is walked element by element."""
    if not spread:
        for part in dotted.split("."):
            if not isinstance(record, dict) or part not in record:
                return None
            record = record[part]
        return record
    nodes = [record]
    for part in dotted.split("."):
        nxt = []
        for node in nodes:
            if isinstance(node, list):
                nxt.extend(el[part] for el in node if isinstance(el, dict) and part in el)
            elif isinstance(node, dict) and part in node:
                nxt.append(node[part])
        nodes = nxt
    return nodes


def _checked(value, stats: collections.Counter, max_chars: int) -> str | None:
    if not isinstance(value, str):
        stats["missing_text_field"] += 1
        return None
    if len(value) > max_chars:
        stats["record_too_long"] += 1
        return None
    if _SURROGATE.search(value):  # a lone \ud800 escape decodes to a str that cannot be encoded
        value, n = _SURROGATE.subn("\ufffd", value)
        stats["undecodable_chars"] += n
    return value


# ---------------------------------------------------------------------------------------------- text

def read_text(chunks, mode: str, max_chars: int, stats) -> Iterator[Record]:
    if mode == "file":
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > max_chars:
                stats["record_too_long"] += 1
                for _ in chunks:  # read on: a damaged tail is still reported as such
                    pass
                return
            parts.append(chunk)
        text = "".join(parts)
        if text.strip():
            yield "0", text, {}
    elif mode == "line":
        for lineno, line in rawio.lines(chunks, rawio.SPLITLINES_SEP, max_chars, stats):
            if line.strip():
                yield str(lineno), line, {}
    else:
        yield from _paragraphs(chunks, max_chars, stats)


def _paragraphs(chunks, max_chars: int, stats) -> Iterator[Record]:
    """Blocks of lines separated by lines of only spaces, tabs or U+3000; each keeps its inner newlines."""
    block: list[str] = []
    start = size = 0
    overlong = False
    for lineno, line in rawio.lines(chunks, rawio.NEWLINE_SEP, max_chars, stats):
        if not line.strip(_PARAGRAPH_BLANK):
            if overlong:
                stats["record_too_long"] += 1
            elif block and any(s.strip() for s in block):
                yield str(start), "\n".join(block), {}
            block, size, overlong = [], 0, False
            continue
        if not block and not overlong:
            start = lineno
        size += len(line) + 1
        if size > max_chars:
            block, overlong = [], True
        elif not overlong:
            block.append(line)
    if overlong:
        stats["record_too_long"] += 1
    elif block and any(s.strip() for s in block):
        yield str(start), "\n".join(block), {}


# ---------------------------------------------------------------------------------------------- JSON

def _key_meta(record, key_field: str) -> dict:
    """`{"key": value}` of the record's data.split_field, which decides its split instead of its text."""
    if not key_field:
        return {}
    value = field(record, key_field) if isinstance(record, dict) else None
    return {} if value is None else {"key": str(value)}


def read_jsonl(chunks, text_field: str, max_chars: int, stats, spread: bool = False,
               key_field: str = "") -> Iterator[Record]:
    for lineno, line in rawio.lines(chunks, rawio.JSONL_SEP, max_chars, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, deep nesting
            stats["bad_json_line"] += 1
            continue
        if not spread:
            text = _checked(field(record, text_field), stats, max_chars)
            if text is not None:
                yield str(lineno), text, _key_meta(record, key_field)
            continue
        values = field(record, text_field, spread=True)
        if not values:
            stats["missing_text_field"] += 1
        for k, value in enumerate(values):
            text = _checked(value, stats, max_chars)
            if text is not None:
                yield (f"{lineno}.{k}" if k else str(lineno)), text, {}


def read_json(chunks, text_field: str, max_chars: int, stats, key_field: str = "") -> Iterator[Record]:
    """A .json file: an array of records (streamed), one object (the field path may cross lists), or, when
    its first line is a complete JSON value of its own, JSON lines."""
    chunks = iter(chunks)
    head = ""
    for chunk in chunks:
        head += chunk
        stripped = head.lstrip()
        if stripped and (stripped[0] != "{" or "\n" in stripped or len(head) > max_chars):
            break
    stripped = head.lstrip()
    stream = itertools.chain([head], chunks)
    if stripped.startswith("["):
        for i, record in enumerate(iter_array(stream, max_chars)):
            text = _checked(field(record, text_field), stats, max_chars)
            if text is not None:
                yield str(i), text, _key_meta(record, key_field)
        return
    if stripped.startswith("{") and not _complete_first_line(stripped):
        parts, size = [], 0
        for chunk in stream:
            size += len(chunk)
            if size > max_chars:
                raise BadFile("record_too_long", f"a whole-file JSON object is longer than {max_chars} characters")
            parts.append(chunk)
        try:
            obj = json.loads("".join(parts))
        except (ValueError, RecursionError) as e:
            raise BadFile("bad_json", str(e)) from None
        values = field(obj, text_field, spread=True)
        if not values:
            stats["missing_text_field"] += 1
        for i, value in enumerate(values):
            text = _checked(value, stats, max_chars)
            if text is not None:
                yield str(i), text, {}
        return
    yield from read_jsonl(stream, text_field, max_chars, stats, spread=True, key_field=key_field)


def _complete_first_line(text: str) -> bool:
    line = rawio.JSONL_SEP.split(text, maxsplit=1)[0]
    try:
        json.loads(line)
        return True
    except (ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------------------------------- CSV / TSV

def read_csv(chunks, column: str, delimiter: str, max_chars: int, stats, key_field: str = "") -> Iterator[Record]:
    """First row is the header; `column` names the text column. TSV has no quoting (quotes are text there)."""
    if csv.field_size_limit() < max_chars:  # process-wide; only ever raised, to the record bound
        csv.field_size_limit(max_chars)
    rows = (line for _, line in rawio.lines(chunks, rawio.JSONL_SEP, max_chars, stats, keepends=True))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(rows, delimiter=delimiter, quoting=quoting, strict=False)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise BadFile("bad_header", str(e)) from None
    if header is None:
        return
    names = [h.strip() for h in header]
    if column not in names:
        raise BadFile("missing_column", f"no column {column!r} in header {header[:8]}")
    idx = names.index(column)
    key_idx = names.index(key_field) if key_field in names else None
    n = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            stats["bad_row"] += 1
            continue
        n += 1
        if not row:
            continue
        if len(row) <= idx:
            stats["bad_row"] += 1
            continue
        text = _checked(row[idx], stats, max_chars)
        if text is not None:
            yield str(n), text, ({"key": row[key_idx]} if key_idx is not None and len(row) > key_idx else {})


# ---------------------------------------------------------------------------------------------- Parquet

def read_parquet(raw: rawio.RawReader, column: str, max_chars: int, stats) -> Iterator[Record]:
    """`column` names a column; a dotted rest walks into struct values. Compressed files go through a
    temporary copy because Parquet needs to seek."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise BadFile("unsupported", "reading Parquet needs pyarrow: pip install 'kslm_jax[data]'") from None
    with contextlib.ExitStack() as stack:
        source = str(raw.path)
        if raw.compressed:
            source = stack.enter_context(tempfile.TemporaryFile())
            for chunk in raw.chunks():
                source.write(chunk)
            source.seek(0)
        try:
            pf = pq.ParquetFile(source)
            names = pf.schema_arrow.names
            name = column if column in names else column.partition(".")[0]
            if name not in names:
                raise BadFile("missing_column", f"no column {column!r} among {names[:8]}")
            rest = column[len(name) + 1:]
            i = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[name]):
                for value in batch.column(0).to_pylist():
                    text = _checked(field(value, rest) if rest else value, stats, max_chars)
                    if text is not None:
                        yield str(i), text, {}
                    i += 1
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise BadFile("corrupt", str(e)) from None
