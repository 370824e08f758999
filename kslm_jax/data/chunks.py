"""Chunks of token documents: random access to pieces of at most seq_len next-token pairs, read from the
ArrayRecord token shards, or from one in-memory array when the split fits in data.cache_mb.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from array_record.python import array_record_module

from kslm_jax.core.errors import KslmError
from kslm_jax.data import shards


class ChunkSource:
    """Random access to (inputs, targets) pieces of at most seq_len tokens.

    A document of n tokens gives n-1 next-token pairs, cut into ceil((n-1)/seq_len) pieces; a piece's
    targets are the following tokens of the same document, so no pair is lost at a cut.
    """

    def __init__(self, files: list[Path], seq_len: int, cache_mb: float = 0):
        self._local = threading.local()  # ArrayRecord readers, one set per reading thread
        self._load_lock = threading.Lock()
        self._flat = None  # all tokens in memory, when they fit in cache_mb
        self._chunk_at = None  # where each chunk's first token sits in _flat
        self.files = files
        per_file = shards.lengths_per_file(files)
        self.lengths = np.concatenate(per_file)
        self.first_record = np.cumsum([0] + [len(x) for x in per_file])
        pairs = self.lengths - 1
        per_doc = np.maximum(0, -(-pairs // seq_len))
        self.doc = np.repeat(np.arange(len(pairs)), per_doc)
        first = np.cumsum(per_doc) - per_doc
        self.start = (np.arange(len(self.doc)) - np.repeat(first, per_doc)) * seq_len
        self.chunk_tokens = np.minimum(seq_len, pairs[self.doc] - self.start)
        self.seq_len = seq_len
        self.cache = 4 * int(self.lengths.sum()) <= cache_mb * 2**20

    def __getstate__(self) -> dict:
        """What a worker process (grain's mp_prefetch) needs: the index; it opens and loads on first read."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_load_lock", "_flat", "_chunk_at")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self._load_lock, self._flat, self._chunk_at = threading.local(), threading.Lock(), None, None

    def _load_all(self) -> None:
        """Every record once, in order, into one array: random reads become slices (about 10 µs a record
        saved, which on short documents is most of the loader's time)."""
        flat = np.empty(int(self.lengths.sum()), shards.TOKEN_DTYPE)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        for f, path in enumerate(self.files):
            reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
            first, end = int(self.first_record[f]), int(self.first_record[f + 1])
            raws = reader.read_all()
            reader.close()
            sizes = np.fromiter(map(len, raws), np.int64, len(raws))
            if len(raws) != end - first or not np.array_equal(sizes, 4 * self.lengths[first:end]):
                for k, raw in enumerate(raws):
                    self._check(first + k, raw)
                raise KslmError(f"token shard {path} holds {len(raws)} records, its index {end - first}; "
                                "run `kslm tokenize` again for this workdir")
            flat[self._offsets[first]: self._offsets[end]] = np.frombuffer(b"".join(raws), shards.TOKEN_DTYPE)
        self._flat = flat

    def _memory(self) -> np.ndarray:
        with self._load_lock:  # several streams' read threads may ask at once; load once
            if self._flat is None:
                self._load_all()
                self._chunk_at = self._offsets[self.doc] + self.start
        return self._flat

    def tokens_of(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat tokens, where each chunk's first token sits in them) for a group of chunks: the whole split
        when it is in memory, else the group's documents read with one batched lookup per shard file."""
        if self.cache:
            flat = self._memory()
            return flat, self._chunk_at[chunks]
        docs, where = np.unique(self.doc[chunks], return_inverse=True)
        flat = np.frombuffer(b"".join(self._read_raw(docs)), shards.TOKEN_DTYPE)
        local = np.cumsum(self.lengths[docs]) - self.lengths[docs]
        return flat, local[where] + self.start[chunks]

    def read_docs(self, docs) -> list[np.ndarray]:
        """Token arrays of these documents, with one batched ArrayRecord lookup per shard file."""
        docs = np.asarray(docs, np.int64)
        if self.cache:
            flat, off = self._memory(), self._offsets
            return [flat[a:b] for a, b in zip(off[docs].tolist(), off[docs + 1].tolist())]
        return [np.frombuffer(r, shards.TOKEN_DTYPE) for r in self._read_raw(docs)]

    def _read_raw(self, docs: np.ndarray) -> list[bytes]:
        readers = getattr(self._local, "readers", None)
        if readers is None:  # opened on first use, in the thread that reads
            readers = self._local.readers = [array_record_module.ArrayRecordReader(str(f), "readahead_buffer_size:0")
                                             for f in self.files]
        file_of = np.searchsorted(self.first_record, docs, side="right") - 1
        raw: list = [None] * len(docs)
        for f in np.unique(file_of).tolist():
            where = np.flatnonzero(file_of == f)
            got = readers[f].read((docs[where] - self.first_record[f]).tolist())
            for i, r in zip(where.tolist(), got):
                raw[i] = r
        sizes = np.fromiter(map(len, raw), np.int64, len(raw))
        if not np.array_equal(sizes, 4 * self.lengths[docs]):
            for d, r in zip(docs.tolist(), raw):
                self._check(d, r)
        return raw

    def _check(self, d: int, raw: bytes) -> None:
        if len(raw) != 4 * self.lengths[d]:  # a shard changed after its index was written
            f = int(np.searchsorted(self.first_record, d, side="right")) - 1
            raise KslmError(f"token shard {self.files[f]} record {d - self.first_record[f]} holds {len(raw)} bytes, "
                            f"its index says {4 * self.lengths[d]}; run `kslm tokenize` again for this workdir")

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i: int) -> dict:
        tokens = self.read_docs([self.doc[i]])[0]
        s = int(self.start[i])
        piece = tokens[s: s + self.seq_len + 1]
        return {"inputs": piece[:-1].astype(np.int32), "targets": piece[1:].astype(np.int32)}
