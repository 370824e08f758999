"""The grain input pipeline: token shards → chunks → shuffle → first-fit packing with segment ids → batches.

Every transformation is a deterministic function of (seed, position), and the iterator's state is a small
JSON dict that the checkpoint stores, so resuming at step N yields exactly the batches of step N onward.
"""
from __future__ import annotations

import fnmatch
import functools
from pathlib import Path

import grain
import jax
import numpy as np

from kslm_jax.data import shards
from kslm_jax.errors import KslmError

FEATURES = ("inputs", "targets")


class ChunkSource:
    """Random access to (inputs, targets) pieces of at most seq_len tokens.

    A document of n tokens gives n-1 next-token pairs, cut into ceil((n-1)/seq_len) pieces; a piece's
    targets are the following tokens of the same document, so no pair is lost at a cut.
    """

    def __init__(self, files: list[Path], seq_len: int):
        self.records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        self.files = files
        per_file = shards.lengths_per_file(files)
        self.lengths = np.concatenate(per_file)
        self.first_record = np.cumsum([0] + [len(x) for x in per_file])
        pairs = self.lengths - 1
        per_doc = np.maximum(0, -(-pairs // seq_len))
        self.doc = np.repeat(np.arange(len(pairs)), per_doc)
        first = np.cumsum(per_doc) - per_doc
        self.start = (np.arange(len(self.doc)) - np.repeat(first, per_doc)) * seq_len
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i: int) -> dict:
        d = int(self.doc[i])
        raw = self.records[d]
        if len(raw) != 4 * self.lengths[d]:  # a shard changed after its index was written
            f = int(np.searchsorted(self.first_record, d, side="right")) - 1
            raise KslmError(f"token shard {self.files[f]} record {d - self.first_record[f]} holds {len(raw)} bytes, "
                            f"its index says {4 * self.lengths[d]}; run `kslm tokenize` again for this workdir")
        tokens = np.frombuffer(raw, shards.TOKEN_DTYPE)
        s = int(self.start[i])
        piece = tokens[s: s + self.seq_len + 1]
        return {"inputs": piece[:-1].astype(np.int32), "targets": piece[1:].astype(np.int32)}


def _to_batch(b: dict) -> dict:
    return {
        "inputs": b["inputs"],
        "targets": b["targets"],
        "positions": b["inputs_positions"],
        "segment_ids": b["inputs_segment_ids"],
    }


def _packed(ds: grain.IterDataset, dcfg, seed: int) -> grain.IterDataset:
    length = {k: dcfg.seq_len for k in FEATURES}
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=length, num_packing_bins=dcfg.packing_bins, seed=seed,
        shuffle_bins=True, max_sequences_per_bin=dcfg.max_segments_per_row)


class _Subset:
    """The chunks of a ChunkSource whose documents belong to one mixture component."""

    def __init__(self, source: ChunkSource, index: np.ndarray):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.index[i])]


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


def mixture_components(source: ChunkSource, tokens_dir: Path, spec: str) -> list[tuple[str, float, np.ndarray]]:
    """(pattern, weight, chunk indices) per mixture component; every source must fall in exactly one."""
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
    chunk_tokens = np.minimum(source.seq_len, source.lengths[source.doc] - 1 - source.start)
    out = []
    for g, (pat, w) in enumerate(patterns):
        idx = np.flatnonzero(chunk_group == g)
        if len(idx) == 0:
            raise KslmError(f"data.mixture pattern {pat!r} matches no training document (sources: "
                            f"{', '.join(names)})")
        # Weights are shares of training tokens: a component of short documents is drawn more often.
        out.append((pat, w / float(chunk_tokens[idx].mean()), idx))
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


def _shuffled(source, seed: int, index: int, count: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(source)
    if count > 1:
        ds = ds[index::count]
    return ds.shuffle(seed=seed).repeat(None).to_iter_dataset()


def _stream(source, dcfg, index: int, count: int, rows: int, components=None) -> grain.IterDataset:
    if components:
        # Each component is shuffled and repeated on its own, then drawn by weight, so a small source is
        # seen more often than its share of tokens when its weight says so.
        parts = [_shuffled(_Subset(source, idx), dcfg.seed + index + 7919 * (g + 1), index, count)
                 for g, (_, _, idx) in enumerate(components)]
        ds = grain.IterDataset.mix(parts, [w for _, w, _ in components])
    else:
        ds = _shuffled(source, dcfg.seed + index, index, count)
    out = _packed(ds, dcfg, dcfg.seed + index).batch(rows, drop_remainder=True).map(_to_batch)
    if dcfg.workers > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=dcfg.workers))
    return out


def train_dataset(tokens_dir: Path, dcfg, global_batch: int, accum: int = 1):
    """The training batches of this process; iterate it, and checkpoint the iterator's state."""
    source = ChunkSource(shards.shard_files(tokens_dir, "train"), dcfg.seq_len)
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
    source = ChunkSource(shards.shard_files(tokens_dir, "val"), dcfg.seq_len)
    rows = _host_slice(global_batch)
    ordered = grain.MapDataset.source(source).to_iter_dataset()
    batches = _packed(ordered, dcfg, 0).batch(global_batch, drop_remainder=False)
    for i, b in enumerate(batches.map(_to_batch)):
        if max_batches and i >= max_batches:
            return
        short = global_batch - b["inputs"].shape[0]
        if short:
            b = {k: np.pad(v, ((0, short), (0, 0))) for k, v in b.items()}
        yield b if rows is None else rows(b)
