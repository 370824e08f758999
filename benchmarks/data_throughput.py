"""Data-stage throughput, one subcommand per stage, each printing a table.

    python benchmarks/data_throughput.py prepare --input ../shared/data/ko/nsmc_reviews.jsonl.gz
    python benchmarks/data_throughput.py prepare --input 'corpus/*.jsonl.gz' --workers 1 --set data.dedup.near=false

    python benchmarks/data_throughput.py tokenize --workdir runs/nsmc      # after kslm prepare and kslm tokenizer
    python benchmarks/data_throughput.py loader --workdir runs/nsmc --seq-len 1024 --batch 32

prepare: the whole `kslm prepare` (read, clean, filter, exact and near dedup, shards, report) into a temporary
folder; MB/s counts the UTF-8 bytes of the documents read, per second of wall time and per worker process.
tokenize: `kslm tokenize` of the workdir's clean shards into a temporary folder; tokens/s per worker.
loader: training batches delivered by the grain loader (order, packing, reads; grain's read thread included)
in this process; tokens/s counts real tokens (padding excluded), the number a device step consumes. The table
names the token shards' ArrayRecord compression (`kslm tokenize` writes them uncompressed since issue 16).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from array_record.python import array_record_module  # noqa: E402

from kslm_jax.core import config as config_lib  # noqa: E402
from kslm_jax.data import prepare as prepare_lib  # noqa: E402


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(args) -> None:
    overrides = [f"data.sources={args.input}", f"data.prepare_workers={args.workers}"] + args.set
    cfg = config_lib.load(args.config, overrides)
    workers = prepare_lib.worker_count(cfg.data.prepare_workers)
    with tempfile.TemporaryDirectory(prefix="kslm-prepare-bench-") as tmp:
        out = Path(tmp) / "clean"
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        report = prepare_lib.prepare(cfg, out)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        mb_out = sum(p.stat().st_size for p in out.glob("*.jsonl")) / 1e6
    # report["chars_in"] counts characters; the UTF-8 bytes are what a disk delivers (an untimed second read)
    mb = _utf8_megabytes(prepare_lib.sources.expand(cfg.data.sources), cfg)
    print(prepare_lib.format_report(report))
    print()
    rows = [("documents read", f"{report['docs_in']:,}"),
            ("documents kept", f"{sum(report['docs_out'].values()):,}"),
            ("exact duplicates removed", f"{report['dedup']['exact']['docs_removed']:,} "
                                         f"({report['dedup']['exact']['clusters']:,} clusters)"),
            ("near duplicates removed", f"{report['dedup']['near']['docs_removed']:,} "
                                        f"({report['dedup']['near']['clusters']:,} clusters)"),
            ("text read (UTF-8 MB)", f"{mb:,.1f}"),
            ("shards written (MB)", f"{mb_out:,.1f}"),
            ("worker processes", str(workers)),
            ("wall time (s)", f"{wall:.1f}"),
            ("CPU time, all processes (s)", f"{cpu:.1f}"),
            ("MB/s", f"{mb / wall:.2f}"),
            ("MB/s per worker", f"{mb / wall / workers:.2f}"),
            ("MB/s per CPU-second", f"{mb / cpu:.2f}"),
            ("documents/s", f"{report['docs_in'] / wall:,.0f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}s}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(report=report, wall_s=wall, cpu_s=cpu, mb=mb, workers=workers),
                                              indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _table(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}s}  {v}")


def bench_tokenize(args) -> None:
    from kslm_jax.core import workdir as workdir_lib
    from kslm_jax.data import shards
    paths = workdir_lib.paths(args.workdir)
    with tempfile.TemporaryDirectory(prefix="kslm-tokenize-bench-") as tmp:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        manifest = shards.tokenize(paths["clean"], paths["tokenizer"], Path(tmp) / "tokens", args.workers)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    tokens = manifest["train"]["tokens"] + manifest["val"]["tokens"]
    workers = args.workers or os.cpu_count()
    _table([("documents", f"{manifest['train']['docs'] + manifest['val']['docs']:,}"),
            ("tokens", f"{tokens:,}"), ("worker processes", str(workers)), ("wall time (s)", f"{wall:.1f}"),
            ("tokens/s", f"{tokens / wall:,.0f}"), ("tokens/s per worker", f"{tokens / wall / workers:,.0f}"),
            ("tokens per CPU-second", f"{tokens / cpu:,.0f}")])


def bench_loader(args) -> None:
    from kslm_jax.core import workdir as workdir_lib
    from kslm_jax.data import pipeline
    cfg = config_lib.load(args.config, [f"data.seq_len={args.seq_len}", f"data.workers={args.prefetch}"] + args.set)
    tokens = workdir_lib.paths(args.workdir)["tokens"]
    it = iter(pipeline.train_dataset(tokens, cfg.data, args.batch))
    next(it)  # index planning and the first epoch's order are paid once per run
    real = 0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    it.close()  # stops grain's threads and, with data.worker_processes, its worker processes
    slots = args.batches * args.batch * args.seq_len
    reader = array_record_module.ArrayRecordReader(str(sorted(Path(tokens).glob("train-*.arrayrecord"))[0]))
    options = reader.writer_options_string()
    reader.close()
    _table([("batch x seq_len", f"{args.batch} x {args.seq_len}"), ("batches", str(args.batches)),
            ("token shards", "uncompressed" if "uncompressed" in options else "compressed (" + options + ")"),
            ("split in memory (data.cache_mb)", str(cfg.data.cache_mb)),
            ("prefetch depth (data.workers)", str(args.prefetch)),
            ("worker processes (data.worker_processes)", str(cfg.data.worker_processes)),
            ("rows filled", f"{real / slots:.1%}"),
            ("wall time (s)", f"{wall:.2f}"), ("tokens/s", f"{real / wall:,.0f}"),
            ("tokens per CPU-second", f"{real / cpu:,.0f}")])


def _utf8_megabytes(files, cfg) -> float:
    """UTF-8 size of every document read."""
    docs = prepare_lib.sources.read_all(files, cfg.data.text_mode, cfg.data.text_field, collections.Counter())
    return sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs) / 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare", help="kslm prepare on a corpus: MB/s per worker, documents in/out per rule")
    p.add_argument("--input", required=True, help="files or globs, as data.sources takes them")
    p.add_argument("--config", default=None, help="recipe to start from (default: base config)")
    p.add_argument("--workers", type=int, default=0, help="data.prepare_workers (0: one per CPU core)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--json", default=None, help="also write the numbers and the report here")
    p.set_defaults(run=bench_prepare)
    p = sub.add_parser("tokenize", help="kslm tokenize of a prepared workdir: tokens/s")
    p.add_argument("--workdir", required=True)
    p.add_argument("--workers", type=int, default=0, help="data.tokenize_workers (0: one per CPU core)")
    p.set_defaults(run=bench_tokenize)
    p = sub.add_parser("loader", help="training batches from a tokenized workdir: tokens/s")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--prefetch", type=int, default=0, help="data.workers: batches made ahead in a thread")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=bench_loader)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
