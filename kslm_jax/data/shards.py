"""ArrayRecord shards of token ids: one record per document, little-endian int32 [BOS, ids..., EOS], uncompressed.

Beside each shard, `<shard>.lengths.npy` holds every record's length so the loader can plan its chunks
without reading the records; `manifest.json` counts documents, tokens and characters per split.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from array_record.python import array_record_module

from kslm_jax.core import progress
from kslm_jax.core.errors import KslmError
from kslm_jax.core.workdir import atomic_write_text
from kslm_jax.data import tokenizer as tok_lib

TOKEN_DTYPE = np.dtype("<i4")


def encode_doc(sp, text: str) -> np.ndarray:
    return np.asarray([tok_lib.BOS, *sp.EncodeAsIds(text), tok_lib.EOS], TOKEN_DTYPE)


def _clean_records(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield r["text"], r.get("source", "")


def tokenize_file(model_path: str, clean_file: str, out_file: str, threads: int = 0) -> dict:
    """One clean shard → one token shard with its length and source indexes; returns its manifest entry.

    Runs in a worker process: the tokenizer is loaded from its file, and documents are encoded in batches
    so SentencePiece's C++ loop does the work. `threads` bounds a morpheme analyser's threads (0: all cores).
    """
    sp = tok_lib.load(Path(model_path), threads)
    out = Path(out_file)
    # One record per chunk, uncompressed: zstd saved 3% of the bytes of token ids and made a random read 4x slower.
    writer = array_record_module.ArrayRecordWriter(str(out), "group_size:1,uncompressed")
    lengths, source_idx, names = [], [], {}
    stats = dict(docs=0, tokens=0, chars=0, bytes=0)
    per_source: dict[str, dict] = {}
    batch: list[tuple[str, str]] = []

    def flush():
        for (text, src), ids in zip(batch, sp.EncodeAsIds([t for t, _ in batch])):
            rec = np.asarray([tok_lib.BOS, *ids, tok_lib.EOS], TOKEN_DTYPE)
            writer.write(rec.tobytes())
            lengths.append(len(rec))
            source_idx.append(names.setdefault(src, len(names)))
            stats["docs"] += 1
            stats["tokens"] += len(rec)
            stats["chars"] += len(text)
            stats["bytes"] += len(text.encode("utf-8"))
            count = per_source.setdefault(src, {"docs": 0, "tokens": 0})
            count["docs"] += 1
            count["tokens"] += len(rec)
        batch.clear()

    for record in _clean_records(Path(clean_file)):
        batch.append(record)
        if len(batch) == 1024:
            flush()
    flush()
    writer.close()
    np.save(f"{out}.lengths.npy", np.asarray(lengths, np.int64))
    np.save(f"{out}.sources.npy", np.asarray(source_idx, np.int32))
    entry = {"bytes": out.stat().st_size, "crc32": _crc32(out), "records": len(lengths),
             "sources": list(names)}
    return dict(stats, file=entry, per_source=per_source)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(tokens_dir: Path, split: str, checksums: bool = True) -> None:
    """Check a split's shards against the manifest before any reader opens them.

    A damaged shard otherwise surfaces as a crash deep inside the ArrayRecord reader (or, worse, as wrong
    tokens); here it is one error naming the file. Sizes and record counts are always checked; CRC32
    reads every byte (about 1 GB/s), so data.verify_shards can turn it off for very large corpora.
    """
    expected = read_manifest(tokens_dir).get(split, {}).get("files")
    if expected is None:  # written before manifests listed their files: nothing to compare with
        return
    redo = "run `kslm tokenize` again for this workdir (the clean corpus is not affected)"
    for name, want in sorted(expected.items()):
        path = tokens_dir / name
        if not path.is_file():
            raise KslmError(f"token shard {path} listed in manifest.json is missing; {redo}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise KslmError(f"token shard {path} is damaged: {size} bytes, manifest.json says {want['bytes']}; {redo}")
        try:
            n = len(np.load(f"{path}.lengths.npy", allow_pickle=False))
        except (OSError, ValueError) as e:
            raise KslmError(f"token shard index {path}.lengths.npy is unreadable ({e}); {redo}") from None
        if n != want["records"]:
            raise KslmError(f"token shard index {path}.lengths.npy lists {n} records, manifest.json says "
                            f"{want['records']}; {redo}")
        if checksums and _crc32(path) != want["crc32"]:
            raise KslmError(f"token shard {path} is damaged: its CRC32 differs from manifest.json; {redo}")


def tokenize(clean_dir: Path, model_path: Path, out_dir: Path, workers: int = 0) -> dict:
    """Tokenize both splits of a prepared corpus into `out_dir`, one token shard per clean shard.

    Shards are encoded by `workers` processes (0: one per core). Finished shards are recorded in a staging
    folder beside `out_dir`, so a run that is killed resumes where it stopped; `out_dir` is replaced only
    when every shard is done, so readers never see a partial set.
    """
    clean_files = {split: sorted(clean_dir.glob(f"{split}-*.jsonl")) for split in ("train", "val")}
    if not clean_files["train"]:
        raise KslmError(f"no train shards in {clean_dir}; run `kslm prepare` for this workdir first")
    staging = out_dir.parent / f".{out_dir.name}.staging"
    job = {"tokenizer_crc32": _crc32(model_path),
           "clean": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for fs in clean_files.values() for f in fs}}
    job_file = staging / "job.json"
    if staging.exists() and (not job_file.is_file() or json.loads(job_file.read_text()) != job):
        shutil.rmtree(staging)  # left by a run over other inputs: nothing in it can be reused
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_file, json.dumps(job) + "\n")
    todo, done = [], {}
    for fs in clean_files.values():
        for f in fs:
            name = f.name.replace(".jsonl", ".arrayrecord")
            marker = staging / f"{name}.done.json"
            if marker.is_file() and (staging / name).is_file():
                entry = json.loads(marker.read_text())
                if (staging / name).stat().st_size == entry["file"]["bytes"]:
                    done[name] = entry
                    continue
            todo.append((str(model_path), str(f), str(staging / name)))
    workers = min(len(todo), workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))  # Kiwi's threads, when the tokenizer uses it
    todo = [(*t, threads) for t in todo]

    sizes = {t[2]: Path(t[1]).stat().st_size for t in todo}
    shown = progress.bar(sum(sizes.values()), "tokenize", "B", scale=True)  # clean text encoded, per shard

    def record(out, entry):  # as each shard finishes, so a crash later keeps it
        atomic_write_text(Path(f"{out}.done.json"), json.dumps(entry) + "\n")
        done[Path(out).name] = entry
        shown.update(sizes[out])

    if workers > 1:
        # spawn, not fork: the parent may hold JAX's threads, which a forked child would inherit half-done.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for t, entry in zip(todo, pool.imap(_tokenize_job, todo)):
                record(t[2], entry)
    else:
        for t in todo:
            record(t[2], tokenize_file(*t))
    shown.close()
    manifest = {split: _merge([(n, done[n]) for n in sorted(done) if n.startswith(split + "-")])
                for split in ("train", "val")}
    sp = tok_lib.load(model_path)
    manifest["vocab_size"] = sp.GetPieceSize()
    for marker in staging.glob("*.done.json"):
        marker.unlink()
    job_file.unlink()
    atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return manifest


def _tokenize_job(args) -> dict:
    return tokenize_file(*args)


def _merge(entries) -> dict:
    split = dict(docs=0, tokens=0, chars=0, bytes=0, files={}, sources={})
    for name, e in entries:
        for k in ("docs", "tokens", "chars", "bytes"):
            split[k] += e[k]
        split["files"][name] = e["file"]
        for src, c in e["per_source"].items():
            tot = split["sources"].setdefault(src, {"docs": 0, "tokens": 0})
            tot["docs"] += c["docs"]
            tot["tokens"] += c["tokens"]
    return split


def sources_of(files: list[Path], manifest_split: dict) -> tuple[list[str], np.ndarray]:
    """Source names of a split and, per record (in file order), the index of its source in that list."""
    names: dict[str, int] = {}
    parts = []
    for f in files:
        entry = manifest_split.get("files", {}).get(f.name)
        if entry is None or not Path(f"{f}.sources.npy").is_file():
            raise KslmError(f"token shard {f} has no source index (tokenized by an older version); "
                            "run `kslm tokenize` again to use data.mixture")
        local = np.load(f"{f}.sources.npy", allow_pickle=False)
        remap = np.asarray([names.setdefault(n, len(names)) for n in entry["sources"]] or [0], np.int32)
        parts.append(remap[local])
    return list(names), np.concatenate(parts)


def read_manifest(tokens_dir: Path) -> dict:
    path = tokens_dir / "manifest.json"
    if not path.is_file():
        raise KslmError(f"{path} not found; run `kslm tokenize` for this workdir first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not JSON or not UTF-8, nested too deep
        raise KslmError(f"{path} is damaged ({str(e)[:200]}); run `kslm tokenize` again for this workdir") from None
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(s, {}), dict) for s in ("train", "val")):
        raise KslmError(f"{path} is not a token manifest; run `kslm tokenize` again for this workdir")
    return manifest


def shard_files(tokens_dir: Path, split: str) -> list[Path]:
    files = sorted(tokens_dir.glob(f"{split}-*.arrayrecord"))
    if not files:
        manifest = tokens_dir / "manifest.json"
        if manifest.is_file() and read_manifest(tokens_dir).get(split, {}).get("docs") == 0:
            raise KslmError(f"the {split} split in {tokens_dir} is empty: raise --config.data.val_fraction or add "
                            "text, then run prepare, tokenizer and tokenize again")
        raise KslmError(f"no {split} token shards in {tokens_dir}; run `kslm tokenize` for this workdir first")
    return files


def lengths(files: list[Path]) -> np.ndarray:
    return np.concatenate(lengths_per_file(files))


def lengths_per_file(files: list[Path]) -> list[np.ndarray]:
    parts = []
    for f in files:
        try:
            parts.append(np.load(f"{f}.lengths.npy", allow_pickle=False))
        except (OSError, ValueError) as e:
            raise KslmError(f"token shard index {f}.lengths.npy is missing or unreadable ({e}); "
                            "run `kslm tokenize` again for this workdir") from None
    return parts
