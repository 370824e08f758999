"""The grain loader: one first-fit packer for chunks and examples, exact mixtures by group, and state that
round-trips through JSON and grain's checkpoint handler inside our orbax Composite."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module

from kslm_jax.core import checkpoint
from kslm_jax.core.config import base_config
from kslm_jax.data import examples, packing, pipeline, shards


def _dcfg(**changes):
    d = base_config().data
    with d.unlocked():
        d.update({"seq_len": 64, "packing_bins": 4, "seed": 0, **changes})
    return d


def _same(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("seq_len, max_segments, bins", [(64, 64, 4), (64, 3, 2), (17, 64, 1), (64, 64, 8)])
def test_first_fit_places_every_item_once_within_the_limits(seq_len, max_segments, bins):
    lengths = np.random.default_rng(seq_len + bins).integers(1, seq_len + 1, 500).tolist()
    rows = packing.first_fit(lengths, seq_len, max_segments, bins)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(r and sum(lengths[i] for i in r) <= seq_len and len(r) <= max_segments for r in rows)
    assert all(r == sorted(r) for r in rows)  # items keep their order inside a row
    if bins >= 4 and max_segments > 3:  # first-fit over a few open rows fills them well
        assert sum(lengths) / (len(rows) * seq_len) > 0.85


def test_gather_puts_each_item_in_its_row(prepared):
    flat = np.arange(1000, dtype=np.int32)
    starts, lengths = np.asarray([0, 100, 200, 300]), np.asarray([5, 3, 7, 2])
    out = packing.gather([[2, 0], [3], [1]], starts, lengths, 4, 16, {"inputs": (flat, 0), "targets": (flat, 1)})
    assert out["inputs"].shape == (4, 16)
    np.testing.assert_array_equal(out["inputs"][0, :12], [*range(200, 207), *range(0, 5)])
    np.testing.assert_array_equal(out["targets"][0, :12], [*range(201, 208), *range(1, 6)])
    np.testing.assert_array_equal(out["segment_ids"][0], [1] * 7 + [2] * 5 + [0] * 4)
    np.testing.assert_array_equal(out["positions"][0, :12], [*range(7), *range(5)])
    np.testing.assert_array_equal(out["inputs"][2, :3], [100, 101, 102])
    assert not out["segment_ids"][3].any() and not out["inputs"][1, 2:].any()


def test_mixture_shares_are_exact_at_every_group():
    comps = [(0.7, np.arange(0, 300)), (0.2, np.arange(300, 350)), (0.1, np.arange(350, 1000))]
    order = pipeline.Order(comps, group=97, seed=5)
    seen = [0, 0, 0]
    shares = np.asarray([w for w, _ in comps]) / sum(w for w, _ in comps)
    for i in range(40):
        ids = order(i)
        for c, (_, idx) in enumerate(comps):
            seen[c] += int(np.isin(ids, idx).sum())
            assert seen[c] == int(np.floor(shares[c] * 97 * (i + 1)))  # never more than one chunk off
    first = np.concatenate([order(i) for i in range(40)])
    small = first[np.isin(first, comps[1][1])]  # component 1 (50 chunks) went round its epochs: 776 draws
    assert set(np.bincount(small - 300, minlength=50).tolist()) == {15, 16}
    again = pipeline.Order(comps, group=97, seed=5)
    assert all(np.array_equal(again(i), order(i)) for i in (39, 3, 0))  # any group, in any order


def test_state_is_grain_json_and_resume_across_epochs_is_exact(prepared):
    tokens = prepared / "data" / "tokens"
    cfg = _dcfg(seq_len=32)
    straight = pipeline.train_dataset(tokens, cfg, 8)
    source = pipeline.ChunkSource(shards.shard_files(tokens, "train"), 32)
    per_epoch = int(np.ceil(source.chunk_tokens.sum() / (8 * 32)))
    batches = [next(straight) for _ in range(per_epoch + 8)]  # well past the end of the first epoch
    it = pipeline.train_dataset(tokens, cfg, 8)
    for _ in range(per_epoch + 3):
        next(it)
    state = it.get_state()
    assert set(state) == {"parent", "batch_idx"} and len(json.dumps(state)) < 80  # grain's few integers
    again = pipeline.train_dataset(tokens, cfg, 8)
    again.set_state(json.loads(json.dumps(state)))
    assert _same([next(again) for _ in range(5)], batches[per_epoch + 3:])


def test_iterator_state_round_trips_through_the_orbax_composite(prepared, tmp_path):
    tokens = prepared / "data" / "tokens"
    it = pipeline.train_dataset(tokens, _dcfg(), 8)
    for _ in range(4):
        next(it)
    saved = json.loads(json.dumps(it.get_state()))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=checkpoint.DataSave(it)))
        mngr.wait_until_finished()
    expect = [next(it) for _ in range(3)]
    written = json.loads((tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json").read_text())
    assert written == saved and set(written) == {"parent", "batch_idx"}  # grain's own state, as grain wrote it
    fresh = pipeline.train_dataset(tokens, _dcfg(), 8)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=checkpoint.DataRestore(fresh)))
    assert _same([next(fresh) for _ in range(3)], expect)


def test_streams_saved_by_two_processes_resume_in_one(prepared, tmp_path, monkeypatch):
    tokens = prepared / "data" / "tokens"
    cfg = _dcfg(streams=4)
    one = pipeline.train_dataset(tokens, cfg, 16)
    straight = [next(one) for _ in range(5)]
    (tmp_path / "data").mkdir()
    halves = []
    for index in range(2):  # each process of a two-process run writes its own streams' states
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda i=index: i)
        it = pipeline.train_dataset(tokens, cfg, 16)
        halves.append([next(it) for _ in range(2)])
        checkpoint.DataHandler().save(tmp_path / "data", item=it)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    resumed = pipeline.train_dataset(tokens, cfg, 16)
    checkpoint.DataHandler().restore(tmp_path / "data", item=resumed)
    assert _same([next(resumed) for _ in range(3)], straight[2:])


def test_old_loader_state_is_refused_by_name(prepared, tmp_path):
    (tmp_path / "process_0-of-1.json").write_text(json.dumps({"pos": [12], "open": [[3, 4]]}))
    with pytest.raises(ValueError, match="does not fit this run's data pipeline"):
        checkpoint.DataHandler().restore(tmp_path, item=pipeline.train_dataset(prepared / "data" / "tokens",
                                                                                _dcfg(), 8))


def test_from_disk_equals_from_memory_and_shards_are_uncompressed(prepared):
    tokens = prepared / "data" / "tokens"
    disk = pipeline.train_dataset(tokens, _dcfg(cache_mb=0), 8)
    memory = pipeline.train_dataset(tokens, _dcfg(), 8)
    prefetched = pipeline.train_dataset(tokens, _dcfg(workers=2), 8)
    a, b, c = ([next(x) for _ in range(6)] for x in (disk, memory, prefetched))
    assert _same(a, b) and _same(a, c)
    reader = array_record_module.ArrayRecordReader(str(shards.shard_files(tokens, "train")[0]))
    assert "uncompressed" in reader.writer_options_string()
    reader.close()


def _examples(n=300, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [[1, *rng.integers(5, 90, int(rng.integers(2, 40))).tolist()] for _ in range(n)]
    flags = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]
    return examples.ExampleSet(seqs, flags)


def test_example_stream_packs_with_the_shared_packer_and_resumes_exactly():
    ex = _examples()
    stream = examples.ExampleStream(ex, 8, 64, 64, seed=3)
    batches = [next(stream) for _ in range(30)]  # about three epochs of 300 examples
    first = batches[0]
    row = first["segment_ids"][0]
    for s in range(1, row.max() + 1):
        at = row == s
        whole = np.concatenate([first["inputs"][0][at], first["targets"][0][at][-1:]])
        e = next(e for e in range(len(ex)) if np.array_equal(ex.seq(e), whole))
        np.testing.assert_array_equal(first["loss_mask"][0][at], ex.flag(e)[1:])
    assert not any(_same([a], [b]) for a, b in zip(batches, batches[1:]))  # a new batch every step
    again = examples.ExampleStream(ex, 8, 64, 64, seed=3)
    for _ in range(13):
        next(again)
    state = json.loads(json.dumps(again.get_state()))
    resumed = examples.ExampleStream(ex, 8, 64, 64, seed=3)
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(10)], batches[13:23])


def test_one_pass_covers_every_example_once_in_full_batches():
    ex = _examples(101)
    seen, batches = [], list(examples.one_pass(ex, 4, 64, 64))
    for batch, plan in batches:
        assert batch["inputs"].shape == (4, 64) and len(plan) <= 4
        for r, row in enumerate(plan):
            assert int(batch["segment_ids"][r].max()) == len(row)
            seen += row
    assert sorted(seen) == list(range(101))
    assert all(len(plan) == 4 for _, plan in batches[:-1])


def test_thread_prefetch_keeps_batches_and_state_exact():
    """packing.Prefetch (grain's thread prefetch, data.workers for fine-tuning) hands out the same batches
    and the state of the last batch handed out, not of the batches it made ahead."""
    ex = _examples()
    plain = examples.ExampleStream(ex, 8, 64, 64, seed=1)
    ahead = packing.Prefetch(examples.ExampleStream(ex, 8, 64, 64, seed=1), 3)
    want = [next(plain) for _ in range(6)]
    got = [next(ahead) for _ in range(4)]
    state = json.loads(json.dumps(ahead.get_state()))
    resumed = examples.ExampleStream(ex, 8, 64, 64, seed=1)
    resumed.set_state(state)
    assert _same(got, want[:4]) and _same([next(resumed), next(resumed)], want[4:])


def test_worker_processes_give_the_same_batches_and_resume(prepared):
    """data.worker_processes (grain's mp_prefetch) packs groups in other processes: the same batches as
    grain's read thread alone, and its own state resumes exactly."""
    tokens = prepared / "data" / "tokens"
    want = [next(it) for it in [pipeline.train_dataset(tokens, _dcfg(), 8)] for _ in range(6)]
    it = pipeline.train_dataset(tokens, _dcfg(worker_processes=2), 8)
    try:
        got = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    again = pipeline.train_dataset(tokens, _dcfg(worker_processes=2), 8)
    try:
        again.set_state(state)
        resumed = [next(again) for _ in range(3)]
    finally:
        again.close()
    assert _same(got, want[:3]) and _same(resumed, want[3:])
