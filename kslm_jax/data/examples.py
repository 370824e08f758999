"""Token sequences of whole examples, packed into rows with segment ids: for fine-tuning and task scoring.

An example is one id sequence (BOS first). In `lm` layout its inputs are ids[:-1] and targets ids[1:], with a
per-target loss mask (SFT: the response; scoring: the continuation); in `cls` layout every id is an input and
the example's last position carries its label. Examples are packed by the same first-fit packer and gather as
pretraining chunks (data/packing.py) and never split: training batches come from the same grain pipeline of
packed groups, evaluation passes from one first-fit packing of the examples in order, cut into batches.
"""
from __future__ import annotations

import numpy as np

from kslm_jax.data import packing

BINS = 8  # rows the first-fit packer keeps open, as data.packing_bins for pretraining


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
    starts = ex.starts[:-1]
    take = {"inputs": (ex.ids, 0)}
    if ex.layout == "lm":
        take["targets"] = (ex.ids, 1)
        if ex.flags is not None:
            take["loss_mask"] = (ex.flags, 1)
    out = packing.gather(plan, starts, ex.lengths, rows, seq_len, take) if plan else {
        k: np.zeros((rows, seq_len), np.int32) for k in (*take, "positions", "segment_ids")}
    if ex.layout == "cls":
        out["targets"] = np.zeros((len(out["inputs"]), seq_len), np.int32)
        out["cls_index"] = np.zeros((len(out["inputs"]), max_segments), np.int32)
        out["cls_label"] = np.full((len(out["inputs"]), max_segments), -1, np.int32)
        if plan:
            items, row, seg, end_in_row = packing.place(plan, ex.lengths)
            out["cls_index"][row, seg - 1] = end_in_row - 1
            if ex.labels is not None:
                out["cls_label"][row, seg - 1] = ex.labels[items]
    return out


def _check_fits(ex: ExampleSet, order: np.ndarray, seq_len: int) -> None:
    over = np.flatnonzero(ex.lengths[order] > seq_len)
    if len(over):
        e = int(order[over[0]])
        raise ValueError(f"example {e} has {int(ex.lengths[e])} positions, over {seq_len}")


def one_pass(ex: ExampleSet, rows: int, seq_len: int, max_segments: int, order=None, fill_fn=fill):
    """(batch, plan) over every example once, in `order` (default: as stored); for evaluation.

    The examples are packed first-fit once, in order, and the rows cut into batches of `rows`; the last
    batch is padded with empty rows. `fill_fn` gathers a batch, as in ExampleStream (preference pairs).
    """
    order = np.arange(len(ex)) if order is None else np.asarray(order, np.int64)
    _check_fits(ex, order, seq_len)
    packed = [[int(order[j]) for j in row]
              for row in packing.first_fit(ex.lengths[order].tolist(), seq_len, max_segments, BINS)]
    for b in range(0, len(packed), rows):
        plan = packed[b: b + rows]
        yield fill_fn(ex, plan, rows, seq_len, max_segments), plan


def ExampleStream(ex: ExampleSet, rows: int, seq_len: int, max_segments: int, seed: int,  # noqa: N802
                  depth: int = 0, fill_fn=fill):
    """Endless packed training batches over reshuffled epochs, a grain iterator (checkpoint its state).

    Group i is examples [i * G, (i + 1) * G) of the endless sequence of seeded per-epoch permutations,
    packed first-fit and gathered as pretraining chunks are (by `fill_fn`: preference pairs have their own, with
    max_segments then counting pairs). `depth` > 0 makes whole batches ahead in grain's prefetch thread.
    """
    if not len(ex):
        raise ValueError("no training examples")
    _check_fits(ex, np.arange(len(ex)), seq_len)
    n = len(ex)
    group = max(1, round(64 * seq_len / max(float(ex.lengths.mean()), 1.0)))  # about 64 rows a group
    perms: dict = {}

    def example_ids(i: int) -> np.ndarray:
        out, lo, hi = [], i * group, (i + 1) * group
        while lo < hi:
            epoch, j = divmod(lo, n)
            if epoch not in perms:
                if len(perms) > 2:  # a group spans at most a few epochs; older ones are never read again
                    del perms[min(perms)]
                perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            out.append(perms[epoch][j: j + hi - lo])
            lo += len(out[-1])
        return np.concatenate(out)

    def pack_group(i: int) -> dict:
        ids = example_ids(i)
        plan = packing.first_fit(ex.lengths[ids].tolist(), seq_len, max_segments, BINS)
        return fill_fn(ex, [[int(ids[j]) for j in row] for row in plan], 0, seq_len, max_segments)

    ds = packing.batches(pack_group, -(-n // group), rows, repeat=True, depth=depth)
    return iter(ds)
