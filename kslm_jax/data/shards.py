"""ArrayRecord shards of token ids: one record per document, little-endian int32 [BOS, ids..., EOS].

Beside each shard, `<shard>.lengths.npy` holds every record's length so the loader can plan its chunks
without reading the records; `manifest.json` counts documents, tokens and characters per split.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from array_record.python import array_record_module

from kslm_jax.data import prepare as prepare_lib
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.errors import KslmError
from kslm_jax.workdir import atomic_dir, atomic_write_text

TOKEN_DTYPE = np.dtype("<i4")


def encode_doc(sp, text: str) -> np.ndarray:
    return np.asarray([tok_lib.BOS, *sp.EncodeAsIds(text), tok_lib.EOS], TOKEN_DTYPE)


def write_split(sp, texts, folder: Path, split: str, per_shard: int) -> dict:
    docs = tokens = chars = nbytes = 0
    shard, lengths, writer = 0, [], None

    files = {}

    def close():
        if writer is not None:
            writer.close()
            name = f"{split}-{shard:05d}.arrayrecord"
            np.save(folder / f"{name}.lengths.npy", np.asarray(lengths, np.int64))
            files[name] = {"bytes": (folder / name).stat().st_size, "crc32": _crc32(folder / name),
                           "records": len(lengths)}

    for text in texts:
        if writer is None or len(lengths) == per_shard:
            if writer is not None:
                close()
                shard += 1
                lengths = []
            writer = array_record_module.ArrayRecordWriter(str(folder / f"{split}-{shard:05d}.arrayrecord"),
                                                           "group_size:1")
        ids = encode_doc(sp, text)
        writer.write(ids.tobytes())
        lengths.append(len(ids))
        docs += 1
        tokens += len(ids)
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
    close()
    return dict(docs=docs, tokens=tokens, chars=chars, bytes=nbytes, files=files)


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
    redo = f"run `kslm tokenize` again for this workdir (the clean corpus is not affected)"
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


def tokenize(clean_dir: Path, sp, out_dir: Path, per_shard: int) -> dict:
    """Tokenize both splits of a prepared corpus into `out_dir`; replaces it only when complete."""
    with atomic_dir(out_dir) as tmp:
        manifest = {split: write_split(sp, prepare_lib.read_clean(clean_dir, split, required=split == "train"),
                                       tmp, split, per_shard)
                    for split in ("train", "val")}
        manifest["vocab_size"] = sp.GetPieceSize()
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(tokens_dir: Path) -> dict:
    path = tokens_dir / "manifest.json"
    if not path.is_file():
        raise KslmError(f"{path} not found; run `kslm tokenize` for this workdir first")
    return json.loads(path.read_text())


def shard_files(tokens_dir: Path, split: str) -> list[Path]:
    files = sorted(tokens_dir.glob(f"{split}-*.arrayrecord"))
    if not files:
        manifest = tokens_dir / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get(split, {}).get("docs") == 0:
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
