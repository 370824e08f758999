"""A token shard damaged after `kslm tokenize` wrote it is refused by name before training reads a byte of
it, and the clean corpus it came from is untouched, so `kslm tokenize` can rebuild it."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
from cli_inproc import kslm

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline, shards
from kslm_jax.objectives import lm


def _shard(wd):
    return sorted((wd / "data" / "tokens").glob("train-*.arrayrecord"))[0]


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _drop_index(path):
    path.with_name(path.name + ".lengths.npy").unlink()


def _short_index(path):
    idx = path.with_name(path.name + ".lengths.npy")
    np.save(idx, np.load(idx)[:-1])


@pytest.mark.parametrize("damage, words", [
    (_flip, "CRC32 differs"),
    (_truncate, "bytes, manifest.json says"),
    (_drop_index, "lengths.npy is unreadable"),
    (_short_index, "records, manifest.json says"),
])
def test_damaged_shard_is_named_before_training(workdir, damage, words):
    shard = _shard(workdir)
    damage(shard)
    cfg = workdir_lib.config_for(workdir, None, [], force=True)
    with pytest.raises(KslmError, match=words) as e:
        lm.trainer(cfg, workdir)
    assert shard.name in str(e.value) and "kslm tokenize" in str(e.value)


def test_manifest_records_every_shard(prepared):
    manifest = shards.read_manifest(prepared / "data" / "tokens")
    for split in ("train", "val"):
        files = manifest[split]["files"]
        on_disk = (prepared / "data" / "tokens").glob(f"{split}-*.arrayrecord")
        assert sorted(files) == sorted(p.name for p in on_disk)
        assert sum(f["records"] for f in files.values()) == manifest[split]["docs"]


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_record_that_disagrees_with_its_index_is_named(workdir, cache_mb):
    # With checksums off, the reader (from disk, or loading the split into memory) still catches a record
    # whose length its index contradicts.
    shard = _shard(workdir)
    idx = shard.with_name(shard.name + ".lengths.npy")
    lengths = np.load(idx)
    lengths[3] += 1
    np.save(idx, lengths)
    source = pipeline.ChunkSource([shard], 64, cache_mb)
    first_piece_of_doc3 = int(np.searchsorted(source.doc, 3))
    with pytest.raises(KslmError, match=rf"{shard.name} record 3 holds"):
        source[first_piece_of_doc3]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*")}


def test_cli_says_one_line_and_tokenize_repairs(workdir):
    clean_before = _digests(workdir / "data" / "clean")
    _flip(_shard(workdir))
    proc = subprocess.run([sys.executable, "-m", "kslm_jax", "train", "--workdir", str(workdir),
                           "--config.train.steps=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kslm: error: token shard") and "CRC32" in lines[0], proc.stderr
    assert _digests(workdir / "data" / "clean") == clean_before
    repaired = kslm("tokenize", "--workdir", workdir)
    assert repaired.returncode == 0, repaired.stderr
    for split in ("train", "val"):
        shards.verify(workdir / "data" / "tokens", split)
