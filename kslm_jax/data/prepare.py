"""`kslm prepare`: raw sources → clean, filtered, deduplicated train/val shards of JSON lines + report.json.

Two passes inside one atomic_dir, so a crash leaves neither half a corpus nor a stale one mixed with a new:
1. read every document, clean and filter it (worker processes, chunk by chunk, results in input order), append
   the survivors to a staging file and their exact keys and MinHash band hashes to a side file;
2. find exact and near duplicates over the whole run, copy the rest into train/val shards.
Memory per document is its key, band hashes (on disk), split, length and source: ~20 bytes, never the text.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from kslm_jax.core import progress
from kslm_jax.core.errors import KslmError
from kslm_jax.core.workdir import atomic_dir, atomic_write_text
from kslm_jax.data import clean, dedup, filters, sources
from kslm_jax.data import report as report_lib
from kslm_jax.data.report import DEDUP_RULES, Tally, format_report  # noqa: F401  (format_report: the CLI table)

CHUNK_DOCS, CHUNK_CHARS = 2000, 4_000_000  # one unit of work for a worker process
_STAGING, _BANDS = ".staging.jsonl", ".bands.u64"


def split_of(text: str, val_fraction: float) -> str:
    """Held-out membership from a hash of the text: stable across runs, machines and input order."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker process needs, as plain values (the config object stays in the parent)."""
    settings: clean.CleanSettings
    val_fraction: float
    exact: bool
    near: bool
    ngram: int
    bands: int
    rows: int
    seed: int

    @classmethod
    def from_config(cls, dcfg) -> "Job":
        d = dcfg.dedup
        return cls(clean.CleanSettings.from_config(dcfg), dcfg.val_fraction, d.exact, d.near, d.ngram, d.bands,
                   d.rows, d.seed)


class Worker:
    """Clean, filter and hash one chunk of documents; a pure function of the chunk, so the result does not
    depend on which process runs it."""

    def __init__(self, job: Job):
        self.job, self.cleaner = job, clean.Cleaner(job.settings)
        self.minhash = dedup.MinHasher(job.ngram, job.bands, job.rows, job.seed) if job.near else None

    def __call__(self, docs: list[tuple[str, str, str]]) -> dict:
        tally, counts = Tally(), collections.Counter()
        cleaned = []
        for doc_id, text, source, key in docs:
            out, reason, touched = self.cleaner.clean(text)
            for t in touched:
                counts[t.rule] += t.count
                tally.add(t.rule, source, 1, t.chars, t.examples)
            cleaned.append((doc_id, out, source, reason, key))
        rest = [i for i, c in enumerate(cleaned) if c[3] is None]
        reasons = filters.rejections([cleaned[i][1] for i in rest], self.job.settings.filters)
        lines, texts, kept_sources, split_keys = [], [], [], []
        for i, reason in zip(rest, reasons):
            doc_id, out, source, _, key = cleaned[i]
            if reason:
                tally.add(reason, source, 1, len(out), (clean.short(out),))
                continue
            lines.append(json.dumps({"id": doc_id, "text": out, "source": source}, ensure_ascii=False) + "\n")
            texts.append(out)
            kept_sources.append(source)
            split_keys.append(out if key is None else key)
        cps, offsets = dedup.normalized(texts)
        return dict(
            blob="".join(lines).encode("utf-8"), sources=kept_sources, tally=tally, counts=counts,
            splits=np.array([split_of(k, self.job.val_fraction) == "val" for k in split_keys], np.uint8),
            lengths=np.fromiter(map(len, texts), np.int64, len(texts)),
            keys=dedup.exact_keys(cps, offsets),
            bands=self.minhash.band_hashes(cps, offsets) if self.minhash else None)


_WORKER: Worker | None = None


def _init_worker(job: Job) -> None:
    global _WORKER
    _WORKER = Worker(job)


def _run_chunk(docs):
    return _WORKER(docs)


def worker_count(requested: int) -> int:
    if requested > 0:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def clean_chunks(chunks, job: Job, workers: int):
    """Worker results in chunk order. A corpus of one chunk, or workers=1, runs in this process; otherwise a
    spawn pool (fork is unsafe once JAX's threads exist) with at most two chunks in flight per worker.
    ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by the OOM killer breaks the executor
    with an error, where Pool would wait for its result forever."""
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if len(head) < 2 or workers <= 1:
        worker = Worker(job)
        yield from map(worker, itertools.chain(head, chunks))
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (job,))
    try:
        pending = collections.deque()
        for chunk in itertools.chain(head, chunks):
            pending.append(pool.submit(_run_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise KslmError("a `kslm prepare` worker process died (out of memory?); run again with "
                        "--config.data.prepare_workers=1 to see why, or give the machine more memory") from None


def _chunks(docs, per_source):
    chunk, chars = [], 0
    for doc in docs:
        src, n = doc.meta["source"], len(doc.text)
        if src not in per_source:
            per_source[src] = collections.Counter()
        counter = per_source[src]
        counter["docs_in"] += 1
        counter["chars_in"] += n
        chunk.append((doc.id, doc.text, src, doc.meta.get("key")))
        chars += n
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    def __init__(self, folder: Path, split: str, per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.index, self.count, self.file = 0, 0, None
        self.docs = self.chars = 0

    def write_line(self, line: bytes, chars: int) -> None:
        if self.file is None or self.count == self.per_shard:
            self._roll()
        self.file.write(line)
        self.count += 1
        self.docs += 1
        self.chars += chars

    def _roll(self):
        if self.file:
            self.file.close()
            self.index += 1
        self.file = open(self.folder / f"{self.split}-{self.index:05d}.jsonl", "wb")
        self.count = 0

    def close(self):
        if self.file:
            self.file.close()


def prepare(cfg, out_dir: Path) -> dict:
    """Write `out_dir/{train,val}-NNNNN.jsonl` and `out_dir/report.json`; returns the report."""
    dcfg = cfg.data
    files = sources.expand(dcfg.sources)
    job = Job.from_config(dcfg)
    with atomic_dir(out_dir) as tmp:
        stats: collections.Counter = collections.Counter()
        tally, per_source = Tally(), {}
        source_ids: dict[str, int] = {}
        cols = collections.defaultdict(list)
        with open(tmp / _STAGING, "wb") as staging, open(tmp / _BANDS, "wb") as band_file:
            read_per_file: dict[str, collections.Counter] = {}  # documents and reader problems of each file
            docs = _chunks(sources.read_all(files, dcfg.text_mode, dcfg.text_field, stats, per_file=read_per_file,
                                            key_field=dcfg.split_field), per_source)
            # Documents are counted as they are cleaned; how many a file holds is not known before it is read.
            shown = progress.bar(None, f"prepare ({len(files)} file{'s' * (len(files) > 1)})", "doc", scale=True)
            for r in clean_chunks(docs, job, worker_count(dcfg.prepare_workers)):
                shown.update(len(r["lengths"]))
                staging.write(r["blob"])
                if r["bands"] is not None:
                    band_file.write(np.ascontiguousarray(r["bands"]).tobytes())
                tally.merge(r["tally"])
                stats.update(r["counts"])
                cols["source"].append(np.array([source_ids.setdefault(s, len(source_ids)) for s in r["sources"]],
                                               np.int64))
                for k in ("splits", "lengths", "keys"):
                    cols[k].append(r[k])
            shown.close()
        dtypes = dict(source=np.int64, splits=np.uint8, lengths=np.int64, keys=np.uint64)
        col = {k: np.concatenate(cols[k]) if cols[k] else np.zeros(0, dt) for k, dt in dtypes.items()}
        n = len(col["keys"])
        bands = np.memmap(tmp / _BANDS, np.uint64, "r", shape=(n, job.bands)) if job.near and n else None
        verdict, owner, dedup_stats = dedup.find_duplicates(col["keys"], bands, job.exact)
        del bands
        (tmp / _BANDS).unlink()
        writers = {s: _ShardWriter(tmp, s, dcfg.shard_docs) for s in ("train", "val")}
        try:
            _copy_survivors(tmp / _STAGING, col, verdict, owner, list(source_ids), writers, tally, per_source)
        finally:
            for w in writers.values():
                try:
                    w.close()
                except OSError:  # after a failed write the disk fails the final flush too
                    pass
        (tmp / _STAGING).unlink()
        report = _report(files, job, stats, tally, per_source, writers, dedup_stats)
        report["read_per_file"] = {src: dict(c) for src, c in read_per_file.items()}
        fields = _field_problems(files, dcfg, stats, report)
        if fields:
            report["fields"] = fields
        if writers["train"].docs == 0:
            if fields.get("text_field"):
                raise KslmError(report_lib.missing_field_error(fields["text_field"], len(files)))
            raise KslmError(f"no documents left after cleaning {len(files)} file(s) from data.sources "
                            f"(dropped: {report['dropped'] or 'none read'}); check the files and "
                            "data.min_chars/min_hangul_ratio")
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _copy_survivors(staging: Path, col, verdict, owner, source_names, writers, tally, per_source):
    """Pass 2: every staged document goes to its shard or is counted as an exact or near duplicate."""
    src_of = col["source"].tolist()
    # Near-duplicate examples show the kept document too: remember the few that the first examples need.
    wanted, shown = set(), collections.Counter()
    for i in np.flatnonzero(verdict == dedup.NEAR).tolist():
        if shown[src_of[i]] < 3:
            shown[src_of[i]] += 1
            wanted.add(int(owner[i]))
    kept_text = {}
    verdict_l, len_l, split_l = verdict.tolist(), col["lengths"].tolist(), col["splits"].tolist()
    with open(staging, "rb") as f:
        for i, line in enumerate(f):
            src, v = source_names[src_of[i]], verdict_l[i]
            if i in wanted:
                kept_text[i] = json.loads(line)["text"]
            if v == dedup.KEEP:
                writers["val" if split_l[i] else "train"].write_line(line, len_l[i])
                per_source[src]["docs_out"] += 1
                per_source[src]["chars_out"] += len_l[i]
                continue
            rule = DEDUP_RULES[0] if v == dedup.EXACT else DEDUP_RULES[1]
            example = ()
            if tally.wants_example(rule, src):
                text = json.loads(line)["text"]
                example = (_near_example(text, kept_text.get(int(owner[i]), "")) if v == dedup.NEAR
                           else clean.short(text),)
            tally.add(rule, src, 1, len_l[i], example)


def _near_example(removed: str, kept: str) -> str:
    """Both texts from a little before where they first differ, so the example shows the difference."""
    first = next((i for i, (a, b) in enumerate(zip(removed, kept)) if a != b), min(len(removed), len(kept)))
    start = max(0, first - 12)
    cut = (lambda t: "…" + t[start:]) if start else (lambda t: t)
    return f"{clean.short(cut(removed))} ≈ {clean.short(cut(kept))}"


def _report(files, job, stats, tally, per_source, writers, dedup_stats) -> dict:
    pii_drops = {r for r, key in clean.ACTION_KEYS.items() if getattr(job.settings, key) == "drop"}
    rules = tally.rule_report(set(filters.FILTERS) | set(DEDUP_RULES) | pii_drops)
    dropped = {r: v["documents"] for r, v in rules.items() if v["kind"] == "drop"}
    sources_out = {}
    for src, c in per_source.items():
        entry = {k: c[k] for k in ("docs_in", "chars_in", "docs_out", "chars_out")}
        entry.update({f"dropped:{r}": v["per_source"][src]["documents"] for r, v in rules.items()
                      if v["kind"] == "drop" and src in v["per_source"]})
        sources_out[src] = entry
    return dict(
        files=len(files),
        docs_in=sum(c["docs_in"] for c in per_source.values()),
        chars_in=sum(c["chars_in"] for c in per_source.values()),
        docs_out={s: w.docs for s, w in writers.items()},
        chars_out={s: w.chars for s, w in writers.items()},
        dropped=dropped,
        cleaning=dict(stats),
        rules=rules,
        dedup=dict(exact=dict(enabled=job.exact, **dedup_stats["exact"]),
                   near=dict(enabled=job.near, **dedup_stats["near"], ngram=job.ngram, bands=job.bands,
                             rows=job.rows, threshold=round(dedup.threshold(job.bands, job.rows), 4))),
        per_source=sources_out,
    )


def _field_problems(files, dcfg, stats, report) -> dict:
    """data.text_field / data.split_field missing from records: how often, and which keys the records have."""
    wanted = {}
    if stats["missing_text_field"]:
        wanted["text_field"] = dcfg.text_field
    if dcfg.split_field:
        wanted["split_field"] = dcfg.split_field
    if not wanted:
        return {}
    census = sources.field_census(files, list(wanted.values()))
    out = {}
    for role, name in wanted.items():
        sampled = census["missing"].get(name, 0)
        if role == "text_field":
            missing, of = stats["missing_text_field"], stats["missing_text_field"] + report["docs_in"]
        elif sampled:  # the split key is read only for kept records; the sample says how often it is absent
            missing, of = sampled, census["records"]
        else:
            continue
        out[role] = dict(name=f"data.{role}", field=name, missing=missing, records=of, keys=census["keys"],
                         sampled=census["records"])
    return out


def read_clean(folder: Path, split: str, required: bool = True):
    """Yield the texts of one split of a prepared corpus (nothing for an empty optional split)."""
    files = sorted(folder.glob(f"{split}-*.jsonl"))
    if not files and (required or not (folder / "report.json").is_file()):
        raise KslmError(f"no {split} shards in {folder}; run `kslm prepare` for this workdir first")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
