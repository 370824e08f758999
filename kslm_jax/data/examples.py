"""Token sequences of whole examples, packed into rows with segment ids: for fine-tuning and task scoring.

An example is one id sequence (BOS first). In `lm` layout its inputs are ids[:-1] and targets ids[1:], with a
per-target loss mask (SFT: the response; scoring: the continuation); in `cls` layout every id is an input and
the example's last position carries its label. Packing is first-fit over the rows of one batch and never
splits an example: a batch ends when the next example fits none of its rows.
"""
from __future__ import annotations

import numpy as np


class ExampleSet:
    def __init__(self, seqs: list, flags: list | None = None, labels=None, layout: str = "lm"):
        self.layout = layout
        lens = np.asarray([len(s) for s in seqs], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)])
        self.ids = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs else np.zeros(0, np.int32)
        self.flags = (np.concatenate([np.asarray(f, np.uint8) for f in flags]) if flags and seqs
                      else None)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.lengths = lens - 1 if layout == "lm" else lens  # input positions each example takes

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, idx) -> "ExampleSet":
        seqs = [self.seq(i) for i in idx]
        flags = None if self.flags is None else [self.flag(i) for i in idx]
        labels = None if self.labels is None else self.labels[np.asarray(idx, np.int64)]
        return ExampleSet(seqs, flags, labels, self.layout)

    def seq(self, i: int) -> np.ndarray:
        return self.ids[self.starts[i]: self.starts[i + 1]]

    def flag(self, i: int) -> np.ndarray:
        return self.flags[self.starts[i]: self.starts[i + 1]]

    def tokens(self) -> int:
        return int(self.lengths.sum())


def fill(ex: ExampleSet, plan: list[list[int]], rows: int, seq_len: int, max_segments: int) -> dict:
    """The arrays of one batch; rows past the plan and positions past each row's examples are padding."""
    out = {k: np.zeros((rows, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    if ex.layout == "lm" and ex.flags is not None:
        out["loss_mask"] = np.zeros((rows, seq_len), np.int32)
    if ex.layout == "cls":
        out["cls_index"] = np.zeros((rows, max_segments), np.int32)
        out["cls_label"] = np.full((rows, max_segments), -1, np.int32)
    for r, row in enumerate(plan):
        off = 0
        for s, e in enumerate(row):
            ids = ex.seq(e)
            n = int(ex.lengths[e])
            if ex.layout == "lm":
                out["inputs"][r, off:off + n] = ids[:-1]
                out["targets"][r, off:off + n] = ids[1:]
                if "loss_mask" in out:
                    out["loss_mask"][r, off:off + n] = ex.flag(e)[1:]
            else:
                out["inputs"][r, off:off + n] = ids
                out["cls_index"][r, s] = off + n - 1
                if ex.labels is not None:
                    out["cls_label"][r, s] = ex.labels[e]
            out["positions"][r, off:off + n] = np.arange(n)
            out["segment_ids"][r, off:off + n] = s + 1
            off += n
    return out


class _Bins:
    """Rows of one batch being filled first-fit."""

    def __init__(self, rows: int, seq_len: int, max_segments: int):
        self.plan = [[] for _ in range(rows)]
        self.used = [0] * rows
        self.seq_len, self.max_segments = seq_len, max_segments

    def place(self, e: int, n: int) -> bool:
        for r, used in enumerate(self.used):
            if used + n <= self.seq_len and len(self.plan[r]) < self.max_segments:
                self.plan[r].append(e)
                self.used[r] = used + n
                return True
        return False

    def rows_used(self) -> list[list[int]]:
        return [row for row in self.plan if row]


def one_pass(ex: ExampleSet, rows: int, seq_len: int, max_segments: int, order=None):
    """(batch, plan) over every example once, in `order` (default: as stored); for evaluation."""
    order = np.arange(len(ex)) if order is None else np.asarray(order)
    i = 0
    while i < len(order):
        bins = _Bins(rows, seq_len, max_segments)
        while i < len(order) and bins.place(int(order[i]), int(ex.lengths[order[i]])):
            i += 1
        plan = bins.rows_used()
        if not plan:
            raise ValueError(f"example {int(order[i])} has {int(ex.lengths[order[i]])} positions, over {seq_len}")
        yield fill(ex, plan, rows, seq_len, max_segments), plan


class ExampleStream:
    """Endless packed training batches over reshuffled epochs; its state is one integer, the examples drawn."""

    def __init__(self, ex: ExampleSet, rows: int, seq_len: int, max_segments: int, seed: int):
        if not len(ex):
            raise ValueError("no training examples")
        self.ex, self.rows, self.seq_len, self.max_segments = ex, rows, seq_len, max_segments
        self.seed = seed
        self.pos = 0
        self._perm = (-1, None)

    def _example(self, pos: int) -> int:
        epoch, j = divmod(pos, len(self.ex))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ex)))
        return int(self._perm[1][j])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.pos
        bins = _Bins(self.rows, self.seq_len, self.max_segments)
        while bins.place(e := self._example(self.pos), int(self.ex.lengths[e])):
            self.pos += 1
        if self.pos == start:
            raise ValueError(f"example {e} has {int(self.ex.lengths[e])} positions, over {self.seq_len}")
        return fill(self.ex, bins.rows_used(), self.rows, self.seq_len, self.max_segments)

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = int(state["pos"])
