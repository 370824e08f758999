"""ArrayRecord shards of token ids: one record per document, little-endian int32 [BOS, ids..., EOS].

Beside each shard, `<shard>.lengths.npy` holds every record's length so the loader can plan its chunks
without reading the records; `manifest.json` counts documents, tokens and characters per split.
"""
from __future__ import annotations

import json
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

    def close():
        if writer is not None:
            writer.close()
            np.save(folder / f"{split}-{shard:05d}.arrayrecord.lengths.npy", np.asarray(lengths, np.int64))

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
    return dict(docs=docs, tokens=tokens, chars=chars, bytes=nbytes)


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
    return np.concatenate([np.load(f"{f}.lengths.npy", allow_pickle=False) for f in files])
