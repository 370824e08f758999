"""Readers: raw files in any of the supported formats → iterator of Document(id, text, meta).

The format comes from the file name (after a .gz/.bz2/.xz/.zst suffix): .jsonl/.ndjson, .json, .csv, .tsv,
.parquet, .xml (MediaWiki dumps), *namuwiki*.json (NamuWiki dumps); anything else is plain text. A file that
cannot be read to the end is counted under `file:<reason>` and the run goes on with what it gave.
"""
from __future__ import annotations

import collections
import glob
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from kslm_jax.core.errors import KslmError
from kslm_jax.data import formats, namuwiki, rawio, wikitext

# Records (lines, paragraphs, files, pages, elements) longer than this are skipped and counted, which bounds
# what one file can make a reader hold in memory.
MAX_RECORD_CHARS = 10_000_000


class Document(NamedTuple):
    id: str
    text: str
    meta: dict


def demo_corpus_files() -> list[Path]:
    """The constitution and bill texts that ship as plain files inside the KoNLPy wheel (public domain).

    find_spec locates the package without importing it, so no Java runtime is needed.
    """
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise KslmError("the demo corpus ships inside the KoNLPy wheel: pip install 'kslm_jax[demo]' (or konlpy)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "corpus"
    files = sorted(root.glob("kolaw/*.txt")) + sorted(root.glob("kobill/*.txt"))
    if not files:
        raise KslmError(f"no corpus files under {root}; reinstall konlpy")
    return files


def expand(sources: str, key: str = "data.sources") -> list[Path]:
    """Comma-separated paths or glob patterns → files, in a stable order; `key` is the config key they came from
    (data.sources, finetune.train_files, ...), for the messages. In data.sources, `demo` names the bundled corpus."""
    items = [s.strip() for s in sources.split(",") if s.strip()]
    if not items:
        raise KslmError(f"config key {key} is empty: give files or globs, e.g. --config.{key}='corpus/*.jsonl.gz'")
    files: list[Path] = []
    for item in items:
        if item == "demo" and key == "data.sources":
            files.extend(demo_corpus_files())
            continue
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise KslmError(f"data source {item} matches no file; check the path in {key}")
        for m in matches:
            if os.path.isdir(m):
                raise KslmError(f"data source {m} is a directory; use a glob such as {m}/*.txt")
            files.append(Path(m))
    return files


def decode_bytes(raw: bytes, stats: collections.Counter) -> str:
    """UTF-8 (BOM or not), UTF-16 with a BOM, CP949 (a superset of EUC-KR), detected from the first bytes;
    characters the detected encoding cannot read are tried in the other one, else become U+FFFD, counted."""
    return rawio.decode_bytes(raw, stats)


def format_of(path: Path) -> str:
    name = rawio.strip_compression(path.name).lower()
    if name.endswith(".xml"):
        return "wikipedia"
    if name.endswith(".json") and ("namuwiki" in name or name.startswith("docdata")):
        return "namuwiki"
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                         (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    return "text"


def _records(path: Path, raw: rawio.RawReader, text_mode: str, text_field: str, max_chars: int, stats,
             key_field: str = ""):
    kind = format_of(path)
    if kind == "parquet":
        return formats.read_parquet(raw, text_field, max_chars, stats)
    if kind == "wikipedia":
        return wikitext.read_dump(raw, max_chars, stats)
    chunks = rawio.text_chunks(raw, stats)
    if kind == "namuwiki":
        return namuwiki.read_dump(chunks, max_chars, stats)
    if kind == "jsonl":
        return formats.read_jsonl(chunks, text_field, max_chars, stats, key_field=key_field)
    if kind == "json":
        return formats.read_json(chunks, text_field, max_chars, stats, key_field)
    if kind in ("csv", "tsv"):
        return formats.read_csv(chunks, text_field, "\t" if kind == "tsv" else ",", max_chars, stats,
                                key_field)
    return formats.read_text(chunks, text_mode, max_chars, stats)


def read_file(path: Path, text_mode: str, text_field: str, stats: collections.Counter,
              max_chars: int = MAX_RECORD_CHARS, key_field: str = "") -> Iterator[Document]:
    """Documents of one file. Damage ends the file, never the run: it is counted as `file:<reason>`
    (empty, binary, truncated, corrupt, unreadable, not_an_array, bad_json, bad_xml, missing_column, ...)."""
    source = str(path)
    try:
        with rawio.RawReader(path) as raw:
            for suffix, text, meta in _records(path, raw, text_mode, text_field, max_chars, stats, key_field):
                meta = {"source": source, **meta} if meta else {"source": source}
                yield Document(f"{source}:{suffix}", text, meta)
    except rawio.BadFile as e:
        stats[f"file:{e.reason}"] += 1


def read_all(files: list[Path], text_mode: str, text_field: str, stats: collections.Counter,
             max_chars: int = MAX_RECORD_CHARS, per_file: dict | None = None,
             key_field: str = "") -> Iterator[Document]:
    """All files in order. With `per_file`, each file's outcome lands there too, keyed by str(path):
    `docs` read plus the reader's counts (file:<reason>, bad_json_line, undecodable_chars, ...)."""
    for path in files:
        counts: collections.Counter = collections.Counter()
        n = 0
        for doc in read_file(path, text_mode, text_field, counts, max_chars, key_field):
            n += 1
            yield doc
        stats.update(counts)
        if per_file is not None:
            entry = per_file.setdefault(str(path), collections.Counter())
            entry["docs"] += n
            entry.update(counts)


def field_census(files: list[Path], fields: list[str], limit: int = 2000) -> dict:
    """Which keys the first `limit` JSON records of each .jsonl file hold, and how many lack each of `fields`:
    what a missing data.text_field or data.split_field is reported with (the full read counts only misses)."""
    records, missing, keys = 0, collections.Counter(), collections.Counter()
    for path in files:
        if format_of(path) != "jsonl":
            continue
        seen = 0
        try:
            with rawio.RawReader(path) as raw:
                for _, line in rawio.lines(rawio.text_chunks(raw, collections.Counter()), rawio.JSONL_SEP,
                                           MAX_RECORD_CHARS, collections.Counter()):
                    if seen >= limit:
                        break
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):
                        continue
                    if not isinstance(record, dict):
                        continue
                    seen += 1
                    keys.update(list(record)[:50])
                    missing.update(f for f in fields if formats.field(record, f) is None)
        except rawio.BadFile:
            continue
        records += seen
    return {"records": records, "missing": dict(missing), "keys": dict(keys.most_common(20))}
