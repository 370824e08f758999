"""Offline distillation: the teacher's top-k per training batch in ArrayRecord shards, read back by hash.

`kslm distill-cache` walks the same loader as `kslm train` (same config, same packing, same order) for
train.steps batches and writes one record per batch: a hash of what the teacher saw (inputs, positions,
segment ids), then its top-k temperature-1 log-probabilities (B, T, k) in float16, bfloat16 or float32,
then their int32 token ids (B, T, k). manifest.json lists the hashes in step order. Training looks each
batch up by its hash, so a resumed run (or one restored after a non-finite step) reads the right record
without any position bookkeeping, and a batch the cache does not hold is one clear error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from kslm_jax.core import sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline
from kslm_jax.model import llama
from kslm_jax.objectives import distill
from kslm_jax.objectives import teacher as teacher_lib

log = logging.getLogger("kslm")

FORMAT = "kslm-distill-cache-1"
DTYPES = ("float16", "bfloat16", "float32")
HASH_LEN = 16
PER_FILE = 256  # records per shard: a few GB at most for B*T = 32k tokens and k = 64


def batch_hash(batch: dict) -> str:
    h = hashlib.sha256()
    for key in ("inputs", "positions", "segment_ids"):
        h.update(np.ascontiguousarray(batch[key], np.int32).tobytes())
    return h.hexdigest()[:HASH_LEN]


def folder(workdir: Path, value: str) -> Path:
    p = Path(value or "distill_cache").expanduser()
    return p if p.is_absolute() else Path(workdir) / p


def _single_process(what: str) -> None:
    if jax.process_count() > 1:
        raise KslmError(f"{what} runs in one process (records hold whole global batches); run it on one host")


def write(cfg, workdir: Path, dtype: str = "float16") -> Path:
    """Run the teacher over the run's first train.steps batches and store its top-k; returns the folder."""
    _single_process("kslm distill-cache")
    d = cfg.distill
    if not d.teacher:
        raise KslmError("kslm distill-cache needs a teacher: set --config.distill.teacher=PATH")
    if d.topk < 1:
        raise KslmError("kslm distill-cache needs --config.distill.topk=K (e.g. 64): the cache holds the top-k only")
    if dtype not in DTYPES:
        raise KslmError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    workdir = Path(workdir)
    teacher = teacher_lib.resolve(cfg, workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules(cfg.mesh.rules)
    params, pshard, tstep = teacher_lib.load_params(teacher, mesh, rules)
    model = llama.Transformer(teacher.model_cfg)
    n_vocab, k = cfg.tokenizer.vocab_size, d.topk

    def top(params, batch):
        with nn.logical_axis_rules(rules):
            logp, ids = distill.teacher_topk(teacher_lib.logits(model, params, batch, n_vocab), k)
        return logp.astype(jax.numpy.dtype(dtype)), ids

    fn = jax.jit(top, in_shardings=(pshard, None), out_shardings=sharding.replicated(mesh))
    tokens = workdir_lib.paths(workdir)["tokens"]
    data = iter(pipeline.train_dataset(tokens, cfg.data, cfg.train.batch_size, cfg.train.grad_accum))
    out = folder(workdir, d.cache)
    steps = cfg.train.steps
    hashes, files = [], []
    from array_record.python import array_record_module
    t0 = time.perf_counter()
    with workdir_lib.atomic_dir(out) as tmp, jax.set_mesh(mesh):
        writer, pending = None, None
        for step in range(steps + 1):
            nxt = None
            if step < steps:
                host = next(data)
                hashes.append(batch_hash(host))
                nxt = (hashes[-1], fn(params, sharding.global_batch(host, mesh, 1)))
            if pending is not None:  # the device computes batch `step` while the host writes batch `step - 1`
                i = step - 1
                if i % PER_FILE == 0:
                    if writer is not None:
                        writer.close()
                    files.append(f"cache-{i // PER_FILE:05d}.arrayrecord")
                    writer = array_record_module.ArrayRecordWriter(str(tmp / files[-1]), "group_size:1")
                h, (logp, ids) = pending
                writer.write(h.encode() + np.asarray(logp).tobytes() + np.asarray(ids, np.int32).tobytes())
                if step % max(1, steps // 10) == 0 or step == steps:
                    log.info("distill-cache: %d/%d batches (%.0fs)", step, steps, time.perf_counter() - t0)
            pending = nxt
        if writer is not None:
            writer.close()
        manifest = {"format": FORMAT, "topk": k, "dtype": dtype, "batch_size": cfg.train.batch_size,
                    "seq_len": cfg.data.seq_len, "vocab_size": n_vocab, "steps": steps, "per_file": PER_FILE,
                    "files": files, "teacher": str(teacher.workdir), "teacher_step": tstep, "hashes": hashes}
        (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return out


class Reader:
    """Adds the teacher's top-k arrays to each host batch, found by the batch's hash."""

    def __init__(self, path: Path, cfg):
        _single_process("training from distill.cache")
        self.path = path
        try:
            m = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise KslmError(f"distillation cache {path} has no readable manifest.json ({e}); "
                            "write it with `kslm distill-cache --workdir WORKDIR`") from None
        if m.get("format") != FORMAT:
            raise KslmError(f"{path / 'manifest.json'} is not a kslm distillation cache ({FORMAT})")
        want = {"batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "vocab_size": cfg.tokenizer.vocab_size}
        for key, value in want.items():
            if m[key] != value:
                raise KslmError(f"distillation cache {path} was written for {key}={m[key]}, this run has {value}: "
                                "the cache does not match this data/config; run `kslm distill-cache` again")
        if m["topk"] < cfg.distill.topk:
            raise KslmError(f"distillation cache {path} holds the teacher's top {m['topk']}, fewer than "
                            f"distill.topk={cfg.distill.topk}; lower distill.topk or write the cache again")
        self.k = cfg.distill.topk
        self.shape = (m["batch_size"], m["seq_len"], m["topk"])
        self.dtype = np.dtype(jax.numpy.dtype(m["dtype"]))
        self.steps = m["steps"]
        self.index = {h: i for i, h in enumerate(m["hashes"])}
        import grain
        self.records = grain.sources.ArrayRecordDataSource([str(path / f) for f in m["files"]])

    def attach(self, batch: dict) -> dict:
        h = batch_hash(batch)
        i = self.index.get(h)
        if i is None:
            raise KslmError(f"a training batch (hash {h}) is not among the {self.steps} batches of the distillation "
                            f"cache {self.path}: the cache does not match this data/config (or the run is longer "
                            "than the cache); run `kslm distill-cache` again for this workdir")
        raw = self.records[i]
        n = int(np.prod(self.shape))
        size = HASH_LEN + n * self.dtype.itemsize + n * 4
        if len(raw) != size or raw[:HASH_LEN].decode("ascii", "replace") != h:
            raise KslmError(f"distillation cache {self.path} record {i} is damaged (size or hash differs); "
                            "run `kslm distill-cache` again")
        logp = np.frombuffer(raw, self.dtype, n, HASH_LEN).reshape(self.shape)
        ids = np.frombuffer(raw, "<i4", n, HASH_LEN + n * self.dtype.itemsize).reshape(self.shape)
        return dict(batch, teacher_logp=logp[..., : self.k], teacher_ids=ids[..., : self.k])
