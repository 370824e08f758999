"""The input pipeline: token shards → chunks → seeded order (mixed by weight) → first-fit packing → batches.

Records are read through grain's ArrayRecord data source; ordering and packing live in data/packing.py.
Every step is a function of (seed, position), and the iterator's state is a small JSON dict that the
checkpoint stores, so resuming at step N yields exactly the batches of step N onward.
"""
from __future__ import annotations

import fnmatch
import functools
from pathlib import Path

import jax
import numpy as np
from array_record.python import array_record_module

from kslm_jax.core.errors import KslmError
from kslm_jax.data import packing, shards

FEATURES = ("inputs", "targets")


class ChunkSource:
    """Random access to (inputs, targets) pieces of at most seq_len tokens.

    A document of n tokens gives n-1 next-token pairs, cut into ceil((n-1)/seq_len) pieces; a piece's
    targets are the following tokens of the same document, so no pair is lost at a cut.
    """

    def __init__(self, files: list[Path], seq_len: int, cache_mb: float = 0):
        self._readers = None
        self._flat = None  # all tokens in memory, when they fit in cache_mb
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

    def read_docs(self, docs) -> list[np.ndarray]:
        """Token arrays of these documents, with one batched ArrayRecord lookup per shard file."""
        docs = np.asarray(docs, np.int64)
        if self.cache:
            if self._flat is None:
                self._load_all()
            flat, off = self._flat, self._offsets
            return [flat[a:b] for a, b in zip(off[docs].tolist(), off[docs + 1].tolist())]
        if self._readers is None:  # opened on first use, in the process (or thread) that reads
            self._readers = [array_record_module.ArrayRecordReader(str(f), "readahead_buffer_size:0")
                             for f in self.files]
        file_of = np.searchsorted(self.first_record, docs, side="right") - 1
        raw: list = [None] * len(docs)
        for f in np.unique(file_of):
            where = np.flatnonzero(file_of == f)
            got = self._readers[f].read((docs[where] - self.first_record[f]).tolist())
            for i, r in zip(where.tolist(), got):
                raw[i] = r
        out = []
        for d, r in zip(docs.tolist(), raw):
            self._check(d, r)
            out.append(np.frombuffer(r, shards.TOKEN_DTYPE))
        return out

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


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`data.mixture` "pattern:weight,..." → [(pattern, weight)], in order (the first matching pattern wins)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        pattern, sep, weight = item.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not pattern or not w > 0:
            raise KslmError(f"config key data.mixture: {item!r} is not pattern:weight with a positive weight, "
                            "e.g. --config.data.mixture='*wiki*:0.3,*reviews*:0.1,*:0.6'")
        out.append((pattern, w))
    return out


def mixture_components(source: ChunkSource, tokens_dir: Path, spec: str) -> list[tuple[float, np.ndarray]]:
    """(draw weight, chunk indices) per mixture component; every source must fall in exactly one."""
    names, per_record = shards.sources_of(source.files, shards.read_manifest(tokens_dir)["train"])
    patterns = parse_mixture(spec)
    group_of_source = []
    for name in names:
        hit = next((g for g, (pat, _) in enumerate(patterns) if fnmatch.fnmatchcase(name, pat)), None)
        if hit is None:
            raise KslmError(f"source {name!r} matches no pattern of data.mixture={spec!r}; add one for it "
                            "(a final '*:weight' catches the rest)")
        group_of_source.append(hit)
    chunk_group = np.asarray(group_of_source, np.int32)[per_record[source.doc]]
    chunk_tokens = source.chunk_tokens
    out = []
    for g, (pat, w) in enumerate(patterns):
        idx = np.flatnonzero(chunk_group == g)
        if len(idx) == 0:
            raise KslmError(f"data.mixture pattern {pat!r} matches no training document (sources: "
                            f"{', '.join(names)})")
        # Weights are shares of training tokens: a component of short documents is drawn more often.
        out.append((w / float(chunk_tokens[idx].mean()), idx))
    return out


def _process_rows(batch: dict, *, index: int, count: int, accum: int) -> dict:
    """This process's rows of a global batch: within each of the `accum` micro-batches, block `index` of
    `count`. sharding.global_batch stacks the processes' blocks back into the same micro-batches."""
    def take(v):
        v = v.reshape(accum, count, v.shape[0] // (accum * count), *v.shape[1:])[:, index]
        return v.reshape(-1, *v.shape[2:])
    return {k: take(v) for k, v in batch.items()}


def _host_slice(global_batch: int, accum: int = 1):
    """A map from a global batch to this process's rows, or None in a single-process run.

    Used for evaluation: every process walks the same (small) validation batches and keeps its rows, so
    all processes run the same number of eval steps. Training reads per-stream shares instead.
    """
    count = jax.process_count()
    if global_batch % (count * accum):
        raise KslmError(f"config key train.batch_size={global_batch} must divide by the process count {count} "
                        f"times train.grad_accum={accum}")
    if count == 1:
        return None
    return functools.partial(_process_rows, index=jax.process_index(), count=count, accum=accum)


class StreamIterator:
    """This process's share of `data.streams` independent streams; a global batch holds every stream's rows.

    Stream s reads only chunks s, s+S, s+2S, ... of the corpus, so each process reads only the records of
    its own streams. Streams go to processes in contiguous blocks and rows are laid out stream by stream
    inside each micro-batch, so the global batches are the same for any process count that divides S;
    each stream's state is kept under its own key, so a checkpoint resumes under any such count.
    """

    def __init__(self, iters: dict, accum: int):
        self.iters, self.accum = iters, accum

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self.iters[s]) for s in sorted(self.iters)]

        def layout(key):
            blocks = [p[key].reshape(self.accum, -1, *p[key].shape[1:]) for p in parts]
            return np.concatenate(blocks, axis=1).reshape(-1, *parts[0][key].shape[1:])
        return {k: layout(k) for k in parts[0]}

    def get_state(self) -> dict:
        return {"streams": {str(s): it.get_state() for s, it in self.iters.items()}}

    def set_state(self, state: dict) -> None:
        missing = [s for s in self.iters if str(s) not in state.get("streams", {})]
        if missing:
            raise ValueError(f"the checkpoint holds no state for data streams {missing}")
        for s, it in self.iters.items():
            it.set_state(state["streams"][str(s)])


def _stream(source, dcfg, index: int, count: int, rows: int, components=None):
    components = components or [(1.0, np.arange(len(source)))]
    # Stream `index` of `count` owns every count-th chunk of each component, so streams never overlap.
    mine = [(w, idx[index::count]) for w, idx in components]
    stream = packing.PackedStream(source, rows, dcfg.packing_bins, dcfg.max_segments_per_row, mine,
                                  seed=dcfg.seed + index)
    return packing.Prefetch(stream, dcfg.workers) if dcfg.workers > 0 else stream


def train_dataset(tokens_dir: Path, dcfg, global_batch: int, accum: int = 1):
    """The training batches of this process; iterate it, and checkpoint the iterator's state."""
    source = ChunkSource(shards.shard_files(tokens_dir, "train"), dcfg.seq_len, dcfg.cache_mb)
    streams, procs = dcfg.streams, jax.process_count()
    if streams % procs:
        raise KslmError(f"config key data.streams={streams} must be a multiple of the process count {procs} "
                        "(set it to the number of hosts, or a multiple, when the run starts)")
    if global_batch % (streams * accum):
        raise KslmError(f"config key train.batch_size={global_batch} must divide by data.streams={streams} "
                        f"times train.grad_accum={accum}")
    rows = global_batch // streams
    components = mixture_components(source, tokens_dir, dcfg.mixture) if dcfg.mixture else None
    if streams == 1:
        return _stream(source, dcfg, 0, 1, rows, components)
    per = streams // procs
    mine = range(jax.process_index() * per, (jax.process_index() + 1) * per)
    return StreamIterator({s: iter(_stream(source, dcfg, s, streams, rows, components)) for s in mine}, accum)


def eval_batches(tokens_dir: Path, dcfg, global_batch: int, max_batches: int = 0):
    """One pass over the validation split in a fixed order; the last batch is padded with empty rows.

    Every process walks the same global batches (so all run the same number of eval steps) and yields its
    rows of each.
    """
    source = ChunkSource(shards.shard_files(tokens_dir, "val"), dcfg.seq_len, dcfg.cache_mb)
    rows = _host_slice(global_batch)
    batches = packing.PackedStream(source, global_batch, dcfg.packing_bins, dcfg.max_segments_per_row,
                                   [(1.0, np.arange(len(source)))], seed=0, shuffle=False, repeat=False)
    for i, b in enumerate(batches):  # the last batch comes padded with empty rows
        if max_batches and i >= max_batches:
            return
        yield b if rows is None else rows(b)
