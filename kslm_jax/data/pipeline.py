"""The input pipeline, a grain pipeline: token shards → chunks → seeded groups (mixed by weight) → first-fit
packing → batches.

Group i of a stream is G chunks at once: for each mixture component, the next slice of its seeded per-epoch
permutation (component c holds exactly floor(share_c * G * (i + 1)) of the first i + 1 groups' chunks). The
group is packed first-fit and gathered into rows in one step (data/packing.py), inside grain's
`MapDataset.range(n).repeat().map_with_index(...)`; grain reads groups ahead in a thread
(`ReadOptions(num_threads=1, prefetch_buffer_size=2)`) and `RebatchIterDataset` cuts the rows into batches.
Tokens come from the ArrayRecord shards (one batched lookup per shard file per group) or, when a split fits
in data.cache_mb, from one array in memory. Every group is a function of (seed, stream, i), so the iterator's
state is grain's few integers (the next group, the row within it), saved by grain's checkpoint handler;
resuming at step N yields exactly the batches of step N onward.
"""
from __future__ import annotations

import fnmatch
import functools
import math
from pathlib import Path

import grain
import jax
import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.data import packing, shards
from kslm_jax.data.chunks import ChunkSource

FEATURES = ("inputs", "targets")
GROUP_ROWS = 64  # rows a group fills on average: larger groups waste less at their end, cost more memory


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


class Order:
    """Which chunks make group i of a stream: a pure function of (seed, i), so any group is reachable at once.

    components: [(draw weight, chunk indices)]. Each component walks its own seeded permutation, one per
    epoch; the group takes floor(p * G * (i + 1)) - floor(p * G * i) chunks of a component of draw share p,
    so the shares are exact to one chunk at every point of the stream, and then shuffles the group's chunks.
    Without shuffle (evaluation), group i is chunks [i * G, (i + 1) * G) in stored order.
    """

    def __init__(self, components, group: int, seed: int, shuffle: bool = True):
        if not shuffle and len(components) != 1:
            raise ValueError("an ordered pass reads one component")
        w = np.asarray([w for w, _ in components], np.float64)
        self.shares = (w / w.sum()).tolist()
        self.index = [np.asarray(idx, np.int64) for _, idx in components]
        self.group, self.seed, self.shuffle = group, seed, shuffle
        self._perms: dict = {}

    def groups_per_pass(self) -> int:
        return -(-sum(map(len, self.index)) // self.group)

    def _perm(self, comp: int, epoch: int) -> np.ndarray:
        key = (comp, epoch)
        perm = self._perms.get(key)
        if perm is None:
            n = len(self.index[comp])
            order = np.random.default_rng([self.seed, comp, epoch]).permutation(n)
            perm = self.index[comp][order]
            if len(self._perms) >= 2 * len(self.index):  # this epoch and the next, per component
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def _take(self, comp: int, lo: int, hi: int) -> list[np.ndarray]:
        n, out = len(self.index[comp]), []
        while lo < hi:
            epoch, j = divmod(lo, n)
            piece = self._perm(comp, epoch)[j: j + hi - lo]
            out.append(piece)
            lo += len(piece)
        return out

    def __call__(self, i: int) -> np.ndarray:
        if not self.shuffle:
            return self.index[0][i * self.group: (i + 1) * self.group]
        parts = []
        for comp, share in enumerate(self.shares):
            parts += self._take(comp, math.floor(share * self.group * i), math.floor(share * self.group * (i + 1)))
        ids = np.concatenate(parts)
        if len(self.index) > 1:  # interleave the components inside the group
            ids = ids[np.random.default_rng([self.seed, len(self.index), i, 1]).permutation(len(ids))]
        return ids


def group_size(source: ChunkSource) -> int:
    """Chunks per group: about GROUP_ROWS rows of seq_len; a function of the split alone, as resume needs."""
    mean = float(source.chunk_tokens.mean()) if len(source) else 1.0
    return max(1, round(GROUP_ROWS * source.seq_len / mean))


def _packer(source: ChunkSource, dcfg, order: Order):
    lengths = source.chunk_tokens

    def pack_group(i: int) -> dict:
        ids = order(i)
        lens = lengths[ids]
        plan = packing.first_fit(lens.tolist(), source.seq_len, dcfg.max_segments_per_row, dcfg.packing_bins)
        flat, starts = source.tokens_of(ids)
        return packing.gather(plan, starts, lens, 0, source.seq_len, {"inputs": (flat, 0), "targets": (flat, 1)})
    return pack_group


class StreamIterator(grain.DatasetIterator):
    """This process's share of `data.streams` independent streams; a global batch holds every stream's rows.

    Stream s reads only chunks s, s+S, s+2S, ... of the corpus, so each process reads only the records of
    its own streams. Streams go to processes in contiguous blocks and rows are laid out stream by stream
    inside each micro-batch, so the global batches are the same for any process count that divides S;
    each stream's grain state is kept under its own key, so a checkpoint resumes under any such count.
    """

    def __init__(self, iters: dict, accum: int):
        super().__init__(list(iters.values()))
        self.iters, self.accum = iters, accum

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


def _stream(source, dcfg, index: int, count: int, rows: int, components=None) -> grain.DatasetIterator:
    components = components or [(1.0, np.arange(len(source)))]
    # Stream `index` of `count` owns every count-th chunk of each component, so streams never overlap.
    mine = [(w, idx[index::count]) for w, idx in components]
    order = Order(mine, group_size(source), dcfg.seed + index)
    ds = packing.batches(_packer(source, dcfg, order), order.groups_per_pass(), rows, repeat=True,
                         depth=dcfg.workers, processes=dcfg.worker_processes)
    return iter(ds)


def train_dataset(tokens_dir: Path, dcfg, global_batch: int, accum: int = 1) -> grain.DatasetIterator:
    """The training batches of this process, a grain iterator; checkpoint its state (get_state/set_state)."""
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
    return StreamIterator({s: _stream(source, dcfg, s, streams, rows, components) for s in mine}, accum)


def eval_batches(tokens_dir: Path, dcfg, global_batch: int, max_batches: int = 0):
    """One pass over the validation split in a fixed order; the last batch is padded with empty rows.

    Every process walks the same global batches (so all run the same number of eval steps) and yields its
    rows of each.
    """
    source = ChunkSource(shards.shard_files(tokens_dir, "val"), dcfg.seq_len, dcfg.cache_mb)
    rows = _host_slice(global_batch)
    order = Order([(1.0, np.arange(len(source)))], group_size(source), 0, shuffle=False)
    ds = packing.batches(_packer(source, dcfg, order), order.groups_per_pass(), global_batch, repeat=False)
    for i, b in enumerate(ds):
        if max_batches and i >= max_batches:
            return
        short = global_batch - len(b["inputs"])
        if short:  # the last batch comes padded with empty rows
            b = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in b.items()}
        yield b if rows is None else rows(b)
