"""Records of small labelled files (fine-tuning examples, evaluation tasks): jsonl, json, csv, tsv, parquet.

Read by the readers of data.sources (rawio.py: decompression by suffix, UTF-8 / UTF-16 / CP949 detection;
formats.py: the record level of each format), but strictly: where a corpus reader counts a bad line and reads
on, a record file stops at it with one error naming the file, the line or record, and what to do, because a
lost example or task item would silently change the task. Every record comes with where it was read (`file
line N` or `file record N`), so a later check can name it too. Text values are NFC-normalized.
"""
from __future__ import annotations

import collections
import unicodedata
from pathlib import Path
from typing import Iterator

from kslm_jax.core.errors import KslmError
from kslm_jax.data import formats, rawio, sources
from kslm_jax.data.jsonstream import iter_array

KINDS = ("jsonl", "json", "csv", "tsv", "parquet")
# What to do about a file that cannot be read to its end, by rawio.BadFile reason.
_ADVICE = {
    "binary": "it is not a text file; give the .jsonl/.csv/.tsv file itself",
    "truncated": "it ends early (a cut-off download or copy?); fetch or write it again",
    "corrupt": "fetch or write it again",
    "unsupported": "install what the message names",
    "not_an_array": "a .json record file holds a list of records, or use .jsonl with one object per line",
    "bad_json": "fix the JSON, or use .jsonl with one object per line",
    "bad_header": "the first line must be the column names",
}


def kind_of(path: Path) -> str:
    kind = sources.format_of(path)
    kind = "json" if kind == "namuwiki" else kind  # a record file that happens to carry a dump-like name
    if kind not in KINDS:
        raise KslmError(f"{path}: unknown record format; use one of " + ", ".join(f".{k}" for k in KINDS)
                        + " (optionally compressed: " + ", ".join(rawio.COMPRESSED) + ")")
    return kind


def read(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of one file; an empty file has none."""
    path = Path(path)
    kind = kind_of(path)
    if not path.is_file():
        raise KslmError(f"{path}: file not found")
    stats: collections.Counter = collections.Counter()
    try:
        with rawio.RawReader(path) as raw:
            for where, rec in _parsed(path, kind, raw, stats):
                _check_stats(stats, path)
                yield where, _record(rec, where)
            _check_stats(stats, path)
    except rawio.BadFile as e:
        if e.reason != "empty":
            raise KslmError(f"{path}: cannot be read ({e}); {_ADVICE.get(e.reason, 'check the file')}") from None


def _parsed(path: Path, kind: str, raw: rawio.RawReader, stats) -> Iterator[tuple[str, object]]:
    def refuse(reason: str, line: int, detail: str):
        raise KslmError(f"{path} line {line}: {detail}; fix or remove that line")

    limit = sources.MAX_RECORD_CHARS
    if kind == "parquet":
        for n, row in enumerate(formats.parquet_rows(raw), 1):
            yield f"{path} record {n}", row
        return
    chunks = rawio.text_chunks(raw, stats)
    if kind == "json":
        layout, content = formats.json_layout(chunks, limit)
        if layout == "lines":  # one JSON value per line; a whole one-line file may still be {"data": [...]}
            content = list(formats.jsonl_records(content, limit, stats, refuse))
            if len(content) != 1 or not _wrapped(content[0][1]):
                yield from ((f"{path} line {n}", rec) for n, rec in content)
                return
            layout, content = "object", content[0][1]
        if layout == "object":
            if not _wrapped(content):
                raise KslmError(f"{path}: a .json record file must hold a list of records (or one key whose value "
                                "is that list); use .jsonl for one object per line")
            content = next(iter(content.values()))
        for n, rec in enumerate(content if layout == "object" else iter_array(content, limit), 1):
            yield f"{path} record {n}", rec
        return
    if kind == "jsonl":
        for n, rec in formats.jsonl_records(chunks, limit, stats, refuse):
            yield f"{path} line {n}", rec
        return
    rows = formats.csv_rows(chunks, "\t" if kind == "tsv" else ",", limit, stats, refuse)
    header = next(rows, None)
    if header is None:
        return
    names = [h.strip() for h in header[1]]
    for n, row in rows:
        if not row:
            continue
        where = f"{path} line {n}"
        if len(row) > len(names):
            raise KslmError(f"{where}: more columns than the header ({', '.join(names)}); quote a field that "
                            "holds the delimiter" + (", or remove the tab inside it" if kind == "tsv" else ""))
        yield where, dict(zip(names, row + [None] * (len(names) - len(row))))


def _wrapped(value) -> bool:
    """{"data": [...]}: the list of records under one key, as some dataset dumps write it."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list)


def _check_stats(stats: collections.Counter, path: Path) -> None:
    """What the shared readers count instead of raising, refused here. The file is decoded a megabyte ahead of
    the parser, so these name the file, not a line."""
    if stats["undecodable_chars"]:
        raise KslmError(f"{path}: {stats['undecodable_chars']} bytes that are neither UTF-8 nor CP949 (nor UTF-16 "
                        "with a byte-order mark); convert the file to UTF-8")
    if stats["record_too_long"]:
        raise KslmError(f"{path}: a line longer than {sources.MAX_RECORD_CHARS:,} characters; split the file's "
                        "records one per line")


def _record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise KslmError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    return {k: unicodedata.normalize("NFC", v) if isinstance(v, str) else v for k, v in rec.items()}

