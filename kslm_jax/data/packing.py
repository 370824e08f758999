"""The one first-fit packer, for pretraining chunks and for fine-tuning and task examples, and the grain
pipeline that turns packed groups into batches.

A group is G items (chunks of documents, or whole examples) read at once. `first_fit` packs their lengths
on plain Python lists, and `gather` moves every token of the group into its row with one indexed gather per
feature: per-item Python (attribute calls, slices, small arrays) is what made per-element pipelines slow on
short documents. `batches` is the grain pipeline over groups:

    MapDataset.range(n).repeat().map_with_index(pack_group)   # group i: a pure function of (seed, i)
        .to_iter_dataset(ReadOptions(num_threads=1, prefetch_buffer_size=2))
        → RebatchIterDataset(rows) [→ ThreadPrefetchIterDataset(depth)]

so the iterator's state is grain's: the next group and the row inside it, a few integers that jump to any
position without replaying the stream.
"""
from __future__ import annotations

import itertools

import grain
import numpy as np
from absl import flags


def first_fit(lengths: list[int], seq_len: int, max_segments: int, bins: int) -> list[list[int]]:
    """Rows of positions into `lengths` (each at most seq_len tokens and max_segments items), first-fit.

    At most `bins` rows are open: an item that fits none of them closes the fullest and opens a new row. A
    row closes as soon as it holds max_segments items or has less room than the group's shortest item (so
    later items never scan it); the open rows are flushed, in order, at the end. Items never split, so each
    must be at most seq_len.
    """
    rows: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []  # free tokens of each open row
    smallest = min(lengths, default=0)
    for i, n in enumerate(lengths):
        for b, r in enumerate(room):
            if n <= r:
                row = open_rows[b]
                row.append(i)
                if r - n < smallest or len(row) == max_segments:
                    rows.append(row)
                    del open_rows[b], room[b]
                else:
                    room[b] = r - n
                break
        else:
            if len(room) == bins:
                b = room.index(min(room))
                rows.append(open_rows.pop(b))
                del room[b]
            if seq_len - n < smallest or max_segments == 1:
                rows.append([i])
            else:
                open_rows.append([i])
                room.append(seq_len - n)
    rows.extend(open_rows)
    return rows


def place(plan: list[list[int]], lengths: np.ndarray):
    """The plan flattened, one entry per item in row order: (item id, row, segment id within the row, token
    offset of the item's end within its row)."""
    per_row = np.fromiter(map(len, plan), np.int64, len(plan))
    items = np.fromiter(itertools.chain.from_iterable(plan), np.int64, int(per_row.sum()))
    row = np.repeat(np.arange(len(plan)), per_row)
    first_item = np.cumsum(per_row) - per_row
    seg = np.arange(len(items)) - np.repeat(first_item, per_row) + 1
    ends = np.cumsum(lengths[items])  # item ends in the stream of all the plan's tokens
    row_start = (ends - lengths[items])[first_item[per_row > 0]]
    return items, row, seg, ends - np.repeat(row_start, per_row[per_row > 0])


def gather(plan: list[list[int]], starts: np.ndarray, lengths: np.ndarray, rows: int, seq_len: int,
           take: dict) -> dict:
    """The arrays of packed rows: every token placed by one indexed gather per feature.

    plan: rows of item ids; starts[i] is where item i's first input token sits in the source arrays and
    lengths[i] how many positions it takes. take: feature name → (flat source array, shift): position j of
    item i reads source[starts[i] + j + shift]. Rows past the plan (up to max(rows, len(plan))) and
    positions past each row's items are zero.
    """
    items, row, seg, end_in_row = place(plan, lengths)
    lens = lengths[items]
    ends = np.cumsum(lens)
    total = int(ends[-1]) if len(ends) else 0
    starts = np.asarray(starts)[items]
    # int32 indices where they fit: half the memory traffic of the repeats and gathers below
    idx = np.int32 if max(total + int(starts.max(initial=0)), len(plan) * seq_len) < 2**31 - 2 else np.int64
    # token t of the plan's stream lands at row * seq_len + (its offset within the row)
    t = np.arange(total, dtype=idx)
    first = np.repeat((ends - lens).astype(idx), lens)
    within = t - first
    dest = t + np.repeat((row * seq_len + end_in_row - ends).astype(idx), lens)
    src = within + np.repeat(starts.astype(idx), lens)
    n = max(rows, len(plan)) * seq_len
    out = {}
    for name, (flat, shift) in take.items():
        arr = np.zeros(n, np.int32)
        arr[dest] = flat[src + shift] if shift else flat[src]
        out[name] = arr
    out["positions"] = np.zeros(n, np.int32)
    out["positions"][dest] = within
    out["segment_ids"] = np.zeros(n, np.int32)
    out["segment_ids"][dest] = np.repeat(seg, lens)
    return {k: v.reshape(-1, seq_len) for k, v in out.items()}


def _flags_parsed(*_) -> None:
    # We parse no absl flags, but grain reads its own when it starts workers and inside each spawned worker:
    # unparsed, that is UnparsedFlagAccessError (and a parent left waiting on a dead worker).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batches(pack_group, groups: int, rows: int, *, repeat: bool, depth: int = 0, processes: int = 0,
            read_threads: int = 1, read_buffer: int = 2) -> grain.IterDataset:
    """grain dataset of batches of `rows` rows from `groups` packed groups (endless when `repeat`).

    pack_group(i) → dict of (k, seq_len) arrays, the i-th group's rows (k >= 1); it runs in grain's read
    thread, `read_buffer` groups ahead. `depth` > 0 adds grain's thread prefetch of whole batches (data.workers),
    so rebatching, too, leaves the training thread. `processes` > 0 packs groups in grain's worker processes
    (mp_prefetch, data.worker_processes): the batches are the same for any number, the state's layout is not.
    """
    ds = grain.MapDataset.range(groups)
    if repeat:
        ds = ds.repeat()
    ds = ds.map_with_index(lambda i, _: pack_group(i))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer))
    if processes > 0:
        _flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes), worker_init_fn=_flags_parsed)
    it = grain.experimental.RebatchIterDataset(it, rows)
    if depth > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=depth)
    return it


def Prefetch(stream, depth: int):  # noqa: N802 - the name callers of the old thread prefetch use
    """A batch iterator made `depth` batches ahead by grain's prefetch thread; the state is that of the last
    batch handed out, so a checkpoint is exact."""
    return grain.experimental.ThreadPrefetchDatasetIterator(stream, depth) if depth > 0 else stream
