"""Packed batches planned from chunk lengths alone, then filled with one batched read per batch.

grain's per-element pipeline (shuffle → prefetch → first-fit packing) costs tens of microseconds of Python
per chunk, which on short documents (reviews, chat turns) caps a host at tens of thousands of tokens/s.
Here the order and the packing need only integers known before any record is read: the chunk order is a
seeded permutation per epoch, sources are interleaved by a deterministic weighted round robin, and the
first-fit packer works on lengths. Records are read once per batch through ArrayRecord's batched lookup.
The whole position in the stream is a small JSON state, so a checkpoint resumes at the same batch.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

FEATURES = ("inputs", "targets", "positions", "segment_ids")


class PackedStream:
    """Infinite (or, for evaluation, one ordered pass of) packed batches of `rows` x `seq_len`.

    components: [(weight, chunk indices)], one per mixture component (one component: no mixture).
    """

    def __init__(self, source, rows: int, bins: int, max_segments: int, components, seed: int,
                 shuffle: bool = True, repeat: bool = True):
        self.source, self.rows, self.seq_len = source, rows, source.seq_len
        self.bins_max, self.max_segments = bins, max_segments
        self.index = [np.asarray(idx, np.int64) for _, idx in components]
        w = np.asarray([w for w, _ in components], np.float64)
        self.weights = (w / w.sum()).tolist()
        self.seed, self.shuffle, self.repeat = seed, shuffle, repeat
        self.pos = [0] * len(self.index)       # chunks drawn from each component so far
        self.open: list[list[int]] = []         # chunk ids in each open bin, in arrival order
        self.used: list[int] = []               # tokens in each open bin
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        # Python lists of the next few thousand (chunk, length) per component: numpy scalar indexing per
        # chunk would cost more than the packing itself. Rebuilt from `pos`, so never part of the state.
        self._buf: dict[int, tuple[int, list, list]] = {}

    # -- state ---------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"pos": list(self.pos), "open": [list(b) for b in self.open]}

    def set_state(self, state: dict) -> None:
        if len(state["pos"]) != len(self.index):
            raise ValueError(f"the checkpoint's data state has {len(state['pos'])} sources, this run has "
                             f"{len(self.index)}; the data mixture changed")
        self.pos = [int(p) for p in state["pos"]]
        self.open = [[int(c) for c in b] for b in state["open"]]
        lengths = self.source.chunk_tokens
        self.used = [int(lengths[b].sum()) if b else 0 for b in self.open]

    # -- order ---------------------------------------------------------------------------------------
    def _perm(self, comp: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(comp)
        if cached is None or cached[0] != epoch:
            n = len(self.index[comp])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, comp, epoch])
                order = rng.permutation(n).astype(np.int32 if n < 2**31 else np.int64)
            else:
                order = np.arange(n)
            cached = (epoch, self.index[comp][order])
            self._perm_cache[comp] = cached
        return cached[1]

    def _draw(self) -> tuple[int, int] | None:
        """The next (chunk id, tokens), or None when a single pass is over."""
        comp = 0
        if len(self.index) > 1:
            # Weighted round robin: the component furthest behind its share goes next. Exact shares, no RNG.
            k = sum(self.pos) + 1
            comp = max(range(len(self.index)), key=lambda i: self.weights[i] * k - self.pos[i])
        p = self.pos[comp]
        start, ids, lens = self._buf.get(comp, (0, [], []))
        if not start <= p < start + len(ids):
            n = len(self.index[comp])
            epoch, j = divmod(p, n)
            if epoch and not self.repeat:
                return None
            block = self._perm(comp, epoch)[j: j + 4096]  # never past the epoch's end
            start, ids, lens = p, block.tolist(), self.source.chunk_tokens[block].tolist()
            self._buf[comp] = (start, ids, lens)
        self.pos[comp] = p + 1
        return ids[p - start], lens[p - start]

    # -- packing -------------------------------------------------------------------------------------
    def _next_row(self) -> list[int] | None:
        while True:
            drawn = self._draw()
            if drawn is None:  # end of a single pass: flush the open bins in order
                return self._emit(0) if self.open else None
            c, n = drawn
            for b, used in enumerate(self.used):
                if used + n <= self.seq_len and len(self.open[b]) < self.max_segments:
                    self.open[b].append(c)
                    self.used[b] = used + n
                    break
            else:
                row = self._emit(self.used.index(max(self.used))) if len(self.open) >= self.bins_max else None
                self.open.append([c])
                self.used.append(n)
                if row is not None:
                    return row

    def _emit(self, b: int) -> list[int]:
        self.used.pop(b)
        return self.open.pop(b)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        plan = []
        for _ in range(self.rows):
            row = self._next_row()
            if row is None:
                break
            plan.append(row)
        if not plan:
            raise StopIteration
        return self._fill(plan)

    def _fill(self, plan: list[list[int]]) -> dict:
        src, t = self.source, self.seq_len
        chunks = np.asarray([c for row in plan for c in row], np.int64)
        records = src.read_docs(src.doc[chunks])
        starts, lens = src.start[chunks], src.chunk_tokens[chunks]
        pieces = [tok[s: s + n + 1] for tok, s, n in zip(records, starts.tolist(), lens.tolist())]
        # Every chunk's tokens land at (row, offset) computed for all chunks at once.
        per_row = np.asarray([len(row) for row in plan])
        row_of = np.repeat(np.arange(len(plan)), per_row)
        first_in_row = np.cumsum(per_row) - per_row
        ends = np.cumsum(lens)
        row_base = (ends - lens)[first_in_row]
        seg = np.arange(len(chunks)) - np.repeat(first_in_row, per_row) + 1
        offset_in_row = np.repeat(ends - lens - np.repeat(row_base, per_row), lens)
        within = np.arange(int(ends[-1])) - np.repeat(ends - lens, lens)
        dest = np.repeat(row_of, lens) * t + offset_in_row + within
        out = {k: np.zeros((self.rows, t), np.int32) for k in FEATURES}
        flat = np.concatenate(pieces)  # each piece is its chunk's inputs plus one more token
        piece_end = np.cumsum(lens + 1)
        out["inputs"].reshape(-1)[dest] = np.delete(flat, piece_end - 1)
        out["targets"].reshape(-1)[dest] = np.delete(flat, piece_end - lens - 1)
        out["positions"].reshape(-1)[dest] = within
        out["segment_ids"].reshape(-1)[dest] = np.repeat(seg, lens)
        return out


class Prefetch:
    """Batches made `depth` ahead in a background thread; the state is that of the last batch handed out.

    Filling a batch is numpy and ArrayRecord reads, which release the GIL for much of their time, so one
    thread hides the loader behind the device step without the cost of worker processes.
    """

    def __init__(self, stream: PackedStream, depth: int):
        self.stream, self.depth = stream, depth
        self._state = stream.get_state()
        self._queue: queue.Queue | None = None
        self._thread = None
        self._stop = threading.Event()

    def _start(self):
        self._queue = queue.Queue(self.depth)
        self._stop.clear()

        def work():
            while not self._stop.is_set():
                try:
                    item = (next(self.stream), self.stream.get_state(), None)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                    item = (None, None, e)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
        self._thread = threading.Thread(target=work, daemon=True, name="kslm-loader")
        self._thread.start()

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start()
        batch, state, err = self._queue.get()
        if err is not None:
            self._thread = None
            raise err
        self._state = state
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._halt()
        self.stream.set_state(state)
        self._state = self.stream.get_state()
