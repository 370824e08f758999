"""Records of small labelled files (fine-tuning examples, evaluation tasks): jsonl, json, csv, tsv, each maybe .gz.

Every record comes with where it was read (`file line N` or `file record N`), so a bad one can be named.
TSV is read without quote processing: KorNLI and KorSTS sentences begin with quotation marks.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import unicodedata
from pathlib import Path
from typing import Iterator

from kslm_jax.core.errors import KslmError

KINDS = ("jsonl", "json", "csv", "tsv")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in KINDS:
        raise KslmError(f"{path}: unknown record format {ext or '(no extension)'!r}; use one of "
                        + ", ".join(f".{k}" for k in KINDS) + " (optionally .gz)")
    return ext


def _open(path: Path):
    if not path.is_file():
        raise KslmError(f"{path}: file not found")
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    # utf-8-sig: files saved by spreadsheet programs start with a byte-order mark.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of one file; text values NFC-normalized."""
    path = Path(path)
    kind = kind_of(path)
    try:
        with _open(path) as f:
            if kind == "jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path} line {n}"
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise KslmError(f"{where}: not valid JSON ({e.msg})") from None
                    yield where, _record(rec, where)
            elif kind == "json":
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise KslmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
                if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                    data = next(iter(data.values()))  # {"data": [...]} as some dataset dumps write it
                if not isinstance(data, list):
                    raise KslmError(f"{path}: a .json task file must hold a list of records")
                for n, rec in enumerate(data, 1):
                    yield f"{path} record {n}", _record(rec, f"{path} record {n}")
            else:
                opts = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else {}
                reader = csv.DictReader(f, **opts)
                for rec in reader:
                    where = f"{path} line {reader.line_num}"
                    if None in rec:
                        raise KslmError(f"{where}: more columns than the header ({', '.join(reader.fieldnames)})")
                    yield where, _record(rec, where)
    except UnicodeDecodeError as e:
        raise KslmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except (OSError, EOFError, csv.Error) as e:
        raise KslmError(f"{path}: cannot be read ({e})") from None


def _record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise KslmError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    return {k: unicodedata.normalize("NFC", v) if isinstance(v, str) else v for k, v in rec.items()}


def files(spec: str) -> list[Path]:
    """A comma-separated list of paths (globs expand, in sorted order)."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        p = Path(item)
        if any(ch in item for ch in "*?["):
            hits = sorted(p.parent.glob(p.name))
            if not hits:
                raise KslmError(f"{item}: no file matches")
            out.extend(hits)
        else:
            out.append(p)
    return out
