"""Readers for the record formats: plain text, JSON lines, whole-file JSON, CSV/TSV and Parquet.

Two levels, one stack. The record level (`jsonl_records`, `json_layout`, `csv_rows`, `parquet_rows`) parses a
file into records and hands each unreadable line or row to `on_bad(reason, line, detail)`. data.sources passes
a counter (`counting`): a corpus reads on past a bad line. data.records passes a function that raises: a lost
fine-tuning example or task item would silently change the task. The text level (`read_*`) takes a stream of
decoded text (Parquet: the raw file), yields (id suffix, text, extra meta) for data.sources and counts what it
skips in `stats`. Damage that ends a file raises rawio.BadFile at both levels.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import json
import re
import tempfile
from typing import Callable, Iterator

from kslm_jax.data import rawio
from kslm_jax.data.jsonstream import iter_array
from kslm_jax.data.rawio import BadFile

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PARAGRAPH_BLANK = " \t\u3000"
Record = tuple[str, str, dict]
OnBad = Callable[[str, int, str], None]


def counting(stats: collections.Counter) -> OnBad:
    """The corpus way with a bad line or row: count it under its reason, read on."""
    return lambda reason, line, detail: stats.update((reason,))


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


def jsonl_records(chunks, max_chars: int, stats, on_bad: OnBad) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line; a line that is not JSON goes to on_bad."""
    for lineno, line in rawio.lines(chunks, rawio.JSONL_SEP, max_chars, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, deep nesting
            on_bad("bad_json_line", lineno, f"not valid JSON ({getattr(e, 'msg', e)})")
            continue
        yield lineno, record


def read_jsonl(chunks, text_field: str, max_chars: int, stats, spread: bool = False,
               key_field: str = "") -> Iterator[Record]:
    for lineno, record in jsonl_records(chunks, max_chars, stats, counting(stats)):
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


def json_layout(chunks, max_chars: int):
    """How a .json file holds its records: ("array", stream of the text), ("object", the parsed object) or,
    when its first line is a complete JSON value of its own, ("lines", stream of the text)."""
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
        return "array", stream
    if stripped.startswith("{") and not _complete_first_line(stripped):
        parts, size = [], 0
        for chunk in stream:
            size += len(chunk)
            if size > max_chars:
                raise BadFile("record_too_long", f"a whole-file JSON object is longer than {max_chars} characters")
            parts.append(chunk)
        try:
            return "object", json.loads("".join(parts))
        except (ValueError, RecursionError) as e:
            raise BadFile("bad_json", str(e)) from None
    return "lines", stream


def read_json(chunks, text_field: str, max_chars: int, stats, key_field: str = "") -> Iterator[Record]:
    """A .json file: an array of records (streamed), one object (the field path may cross lists), or JSON
    lines (see json_layout)."""
    layout, content = json_layout(chunks, max_chars)
    if layout == "array":
        for i, record in enumerate(iter_array(content, max_chars)):
            text = _checked(field(record, text_field), stats, max_chars)
            if text is not None:
                yield str(i), text, _key_meta(record, key_field)
    elif layout == "object":
        values = field(content, text_field, spread=True)
        if not values:
            stats["missing_text_field"] += 1
        for i, value in enumerate(values):
            text = _checked(value, stats, max_chars)
            if text is not None:
                yield str(i), text, {}
    else:
        yield from read_jsonl(content, text_field, max_chars, stats, spread=True, key_field=key_field)


def _complete_first_line(text: str) -> bool:
    line = rawio.JSONL_SEP.split(text, maxsplit=1)[0]
    try:
        json.loads(line)
        return True
    except (ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------------------------------- CSV / TSV

def csv_rows(chunks, delimiter: str, max_chars: int, stats, on_bad: OnBad) -> Iterator[tuple[int, list]]:
    """(line number, fields) of every row, the header first; a quoted field may span lines (the number is the
    row's last line). TSV has no quoting: quotes are text there (KorNLI and KorSTS sentences begin with them).
    An empty file yields nothing; a header that cannot be parsed raises BadFile("bad_header")."""
    if csv.field_size_limit() < max_chars:  # process-wide; only ever raised, to the record bound
        csv.field_size_limit(max_chars)
    last = [0]

    def lines():
        for lineno, line in rawio.lines(chunks, rawio.JSONL_SEP, max_chars, stats, keepends=True):
            last[0] = lineno
            yield line

    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines(), delimiter=delimiter, quoting=quoting, strict=False)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise BadFile("bad_header", str(e)) from None
    if header is None:
        return
    yield last[0], header
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            on_bad("bad_row", last[0], f"not a valid {'TSV' if delimiter == chr(9) else 'CSV'} row ({e})")
            continue
        yield last[0], row


def read_csv(chunks, column: str, delimiter: str, max_chars: int, stats, key_field: str = "") -> Iterator[Record]:
    """First row is the header; `column` names the text column."""
    rows = csv_rows(chunks, delimiter, max_chars, stats, counting(stats))
    header = next(rows, None)
    if header is None:
        return
    names = [h.strip() for h in header[1]]
    if column not in names:
        raise BadFile("missing_column", f"no column {column!r} in header {header[1][:8]}")
    idx = names.index(column)
    key_idx = names.index(key_field) if key_field in names else None
    for n, (_, row) in enumerate(rows, 1):
        if not row:
            continue
        if len(row) <= idx:
            stats["bad_row"] += 1
            continue
        text = _checked(row[idx], stats, max_chars)
        if text is not None:
            yield str(n), text, ({"key": row[key_idx]} if key_idx is not None and len(row) > key_idx else {})


# ---------------------------------------------------------------------------------------------- Parquet

def parquet_rows(raw: rawio.RawReader, pick=None) -> Iterator[dict]:
    """Every row as a dict of its columns; `pick(names)` may choose the columns to read from the schema's
    names. Compressed files go through a temporary copy because Parquet needs to seek."""
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
            columns = pick(pf.schema_arrow.names) if pick else None
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                yield from batch.to_pylist()
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise BadFile("corrupt", str(e)) from None


def read_parquet(raw: rawio.RawReader, column: str, max_chars: int, stats) -> Iterator[Record]:
    """`column` names a column; a dotted rest walks into struct values."""
    chosen = []

    def pick(names):
        name = column if column in names else column.partition(".")[0]
        if name not in names:
            raise BadFile("missing_column", f"no column {column!r} among {names[:8]}")
        chosen.append(name)
        return [name]

    for i, row in enumerate(parquet_rows(raw, pick)):
        rest = column[len(chosen[0]) + 1:]
        value = row[chosen[0]]
        text = _checked(field(value, rest) if rest else value, stats, max_chars)
        if text is not None:
            yield str(i), text, {}
