"""`kslm prepare`: raw sources → clean, filtered, exact-deduplicated train/val shards of JSON lines + report."""
from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

from kslm_jax.data import clean, sources
from kslm_jax.errors import KslmError
from kslm_jax.workdir import atomic_dir, atomic_write_text


def split_of(text: str, val_fraction: float) -> str:
    """Held-out membership from a hash of the text: stable across runs, machines and input order."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


class _ShardWriter:
    def __init__(self, folder: Path, split: str, per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.index, self.count, self.file = 0, 0, None
        self.docs = self.chars = 0

    def write(self, doc_id: str, text: str, source: str) -> None:
        if self.file is None or self.count == self.per_shard:
            self._roll()
        self.file.write(json.dumps({"id": doc_id, "text": text, "source": source}, ensure_ascii=False) + "\n")
        self.count += 1
        self.docs += 1
        self.chars += len(text)

    def _roll(self):
        if self.file:
            self.file.close()
            self.index += 1
        self.file = open(self.folder / f"{self.split}-{self.index:05d}.jsonl", "w", encoding="utf-8")
        self.count = 0

    def close(self):
        if self.file:
            self.file.close()


def prepare(cfg, out_dir: Path) -> dict:
    """Write `out_dir/{train,val}-NNNNN.jsonl` and `out_dir/report.json`; returns the report.

    Output goes to a temporary sibling folder that replaces `out_dir` only when complete, so a crashed
    run never leaves a half-written corpus behind for the next stage to pick up.
    """
    dcfg = cfg.data
    files = sources.expand(dcfg.sources)
    with atomic_dir(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, dcfg.shard_docs) for s in ("train", "val")}
        try:
            report = _clean_all(files, dcfg, writers)
        finally:
            for w in writers.values():
                try:
                    w.close()
                except OSError:  # after a failed write the disk fails the final flush too
                    pass
        if writers["train"].docs == 0:
            raise KslmError(f"no documents left after cleaning {len(files)} file(s) from data.sources "
                            f"(dropped: {report['dropped'] or 'none read'}); check the files and "
                            "data.min_chars/min_hangul_ratio")
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _clean_all(files, dcfg, writers) -> dict:
    stats: collections.Counter = collections.Counter()
    dropped: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    per_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seen: set[bytes] = set()
    chars_in = 0
    read_per_file: dict[str, collections.Counter] = {}  # documents and reader problems of each file
    for doc in sources.read_all(files, dcfg.text_mode, dcfg.text_field, stats, per_file=read_per_file):
        src = doc.meta["source"]
        per_source[src]["docs_in"] += 1
        chars_in += len(doc.text)
        text = clean.clean_text(doc.text, dcfg, stats)
        reason = clean.rejection(text, dcfg)
        if reason is None:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                reason = "exact_duplicate"
            seen.add(key)
        if reason:
            dropped[reason] += 1
            per_source[src][f"dropped:{reason}"] += 1
            if len(examples[reason]) < 3:
                examples[reason].append(text[:80])
            continue
        per_source[src]["docs_out"] += 1
        writers[split_of(text, dcfg.val_fraction)].write(doc.id, text, src)
    return dict(
        files=len(files),
        docs_in=sum(c["docs_in"] for c in per_source.values()),
        chars_in=chars_in,
        docs_out={s: w.docs for s, w in writers.items()},
        chars_out={s: w.chars for s, w in writers.items()},
        dropped=dict(dropped),
        cleaning=dict(stats),
        examples=dict(examples),
        per_source={k: dict(v) for k, v in per_source.items()},
        read_per_file={k: dict(v) for k, v in read_per_file.items()},
    )


def format_report(report: dict) -> str:
    lines = [f"{'':24s}{'documents':>12s}{'characters':>14s}",
             f"{'read':24s}{report['docs_in']:>12,d}{report['chars_in']:>14,d}"]
    for reason, n in sorted(report["dropped"].items()):
        lines.append(f"{'dropped: ' + reason:24s}{n:>12,d}")
    for split in ("train", "val"):
        lines.append(f"{'kept: ' + split:24s}{report['docs_out'][split]:>12,d}{report['chars_out'][split]:>14,d}")
    touched = ", ".join(f"{k}={v}" for k, v in sorted(report["cleaning"].items()) if v)
    if touched:
        lines.append(f"cleaning: {touched}")
    return "\n".join(lines)


def read_clean(folder: Path, split: str, required: bool = True):
    """Yield the texts of one split of a prepared corpus (nothing for an empty optional split)."""
    files = sorted(folder.glob(f"{split}-*.jsonl"))
    if not files and (required or not (folder / "report.json").is_file()):
        raise KslmError(f"no {split} shards in {folder}; run `kslm prepare` for this workdir first")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
