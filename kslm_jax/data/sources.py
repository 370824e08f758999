"""Readers: raw files in any of the supported formats → iterator of Document(id, text, meta)."""
from __future__ import annotations

import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

from kslm_jax.errors import KslmError

_BLANK_LINE = re.compile(r"\n[ \t\u3000]*\n")
# JSON lines end only at \n, \r\n or \r: str.splitlines() also splits at U+2028, U+0085 and others, which
# json.dumps(ensure_ascii=False) leaves raw inside strings.
_JSONL_LINE = re.compile(r"\r\n?|\n")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


def expand(sources: str) -> list[Path]:
    """Comma-separated paths or glob patterns → files, in a stable order. `demo` names the bundled corpus."""
    items = [s.strip() for s in sources.split(",") if s.strip()]
    if not items:
        raise KslmError("config key data.sources is empty: give files or globs, e.g. --config.data.sources='corpus/*.jsonl.gz'")
    files: list[Path] = []
    for item in items:
        if item == "demo":
            files.extend(demo_corpus_files())
            continue
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise KslmError(f"data source {item} matches no file; check the path in data.sources")
        for m in matches:
            if os.path.isdir(m):
                raise KslmError(f"data source {m} is a directory; use a glob such as {m}/*.txt")
            files.append(Path(m))
    return files


def decode_bytes(raw: bytes, stats: collections.Counter) -> str:
    """UTF-8 (BOM or not) first, then CP949 (a superset of EUC-KR); bytes neither can read become U+FFFD."""
    for enc in ("utf-8-sig", "cp949"):
        try:
            text = raw.decode(enc)
            if enc != "utf-8-sig":
                stats[f"encoding:{enc}"] += 1
            return text
        except UnicodeDecodeError:
            continue
    text = raw.decode("utf-8", errors="replace")
    stats["undecodable_chars"] += text.count("\ufffd")
    return text


def _open_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise KslmError(f"cannot read {path}: {e}") from None


def _field(record, dotted: str):
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_file(path: Path, text_mode: str, text_field: str, stats: collections.Counter) -> Iterator[Document]:
    name = path.name.removesuffix(".gz")
    text = decode_bytes(_open_bytes(path), stats)
    if name.endswith((".jsonl", ".json")):
        for lineno, line in enumerate(_JSONL_LINE.split(text), 1):
            if not line.strip():
                continue
            try:
                value = _field(json.loads(line), text_field)
            except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, deep nesting
                stats["bad_json_line"] += 1
                continue
            if not isinstance(value, str):
                stats["missing_text_field"] += 1
                continue
            if _SURROGATE.search(value):  # a lone \ud800 escape decodes to a str that cannot be encoded
                value, n = _SURROGATE.subn("\ufffd", value)
                stats["undecodable_chars"] += n
            yield Document(f"{path}:{lineno}", value, {"source": str(path)})
        return
    if text_mode == "file":
        pieces = [text]
    elif text_mode == "line":
        pieces = text.splitlines()
    else:
        pieces = _BLANK_LINE.split(text.replace("\r\n", "\n"))
    for i, piece in enumerate(pieces):
        if piece.strip():
            yield Document(f"{path}:{i}", piece, {"source": str(path)})


def read_all(files: list[Path], text_mode: str, text_field: str, stats: collections.Counter) -> Iterator[Document]:
    for path in files:
        yield from read_file(path, text_mode, text_field, stats)
