"""Every LM recipe compiled for Cloud TPU topologies on this (CPU) machine: fit, memory, FLOPs, collectives,
roofline MFU and compile seconds. From the compiler and a roofline, not a TPU run.

    pip install -e '.[tpu]'
    python benchmarks/tpu_compile.py --out benchmarks/tpu_compile.jsonl      # appends; done rows are skipped
    python benchmarks/tpu_compile.py --out benchmarks/tpu_compile.jsonl --table-only
    python benchmarks/tpu_compile.py --out benchmarks/tpu_compile.jsonl --reaccount   # from --hlo-dir, no compile

Each row is written as soon as its compile ends, so an interrupted run keeps what it measured. The largest
recipes run first. The batch is the recipe's, raised to one row per chip where the slice has more chips than rows.
Each compile leaves what the accounting reads in --hlo-dir (the optimized program's text, gzip, and the
compiler's memory analysis): --reaccount rebuilds every row from there with the current accounting, so fixing
the accounting never needs a second 256-chip compile.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kslm_jax.core import config as config_lib  # noqa: E402
from kslm_jax.core.errors import KslmError  # noqa: E402
from kslm_jax.train import aot, topology  # noqa: E402

RECIPES = ("ko_125m", "ko_1b", "ko_3b", "ko_8b")
TOPOLOGIES = (("v5e-16", 1), ("v5e-256", 1), ("v5p-64", 1), ("v5p-256", 1), ("v6e-64", 1), ("v5e-256", 2))
PRESETS = {  # mesh overrides; multi-slice puts data across the slices, fsdp inside each
    "dp": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.rules=dp"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "mesh.rules=fsdp"],
    "fsdp_tp": ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=4", "mesh.rules=fsdp_tp"],
}
WHERE = {"dp": ("ko_125m",), "fsdp": RECIPES, "fsdp_tp": ("ko_3b", "ko_8b")}  # where each preset matters


def plan():
    """(recipe, topology, slices, preset): fsdp for every recipe first, largest first (the scanned recipes compile
    fastest and decide the largest recipe per topology), then the other presets."""
    rows = []
    for preset in ("fsdp", "dp", "fsdp_tp"):
        for recipe in RECIPES:
            if recipe not in WHERE[preset]:
                continue
            for topo, slices in TOPOLOGIES:
                if slices > 1 and preset != "fsdp":
                    continue
                rows.append((recipe, topo, slices, preset))
    return sorted(rows, key=lambda r: (r[3] != "fsdp", -RECIPES.index(r[0])))


def overrides(recipe_cfg, topo: topology.Topology, preset: str) -> list[str]:
    out = list(PRESETS[preset])
    if topo.slices > 1:
        out = [o for o in out if not o.startswith(("mesh.data", "mesh.fsdp"))]
        out += [f"mesh.data={topo.slices}", "mesh.fsdp=-1", f"mesh.slices={topo.slices}"]
    rows_needed = topo.devices_total // (4 if preset == "fsdp_tp" else 1)
    if recipe_cfg.train.batch_size < rows_needed:
        out.append(f"train.batch_size={rows_needed}")
    return out


def _key(row: dict) -> tuple:
    return row["recipe"], row["topology"], row["slices"], row["preset"]


def key_name(recipe: str, topo_name: str, slices: int, preset: str) -> str:
    return f"{recipe}@{topo_name}x{slices}:{preset}"


def compile_facts(cfg, topo, base: Path) -> dict:
    """Compile once; keep the compiler's facts (base.meta.json) and the program text (base.hlo.gz)."""
    t0 = time.perf_counter()
    try:
        facts, text = aot.compile_facts(cfg, topo)
    except aot.DoesNotFit as e:
        facts = {"refusal": str(e), "compile_seconds": time.perf_counter() - t0}
    else:
        with gzip.open(f"{base}.hlo.gz", "wt") as f:
            f.write(text)
    Path(f"{base}.meta.json").write_text(json.dumps(facts))
    return facts


def measure(recipe: str, topo_name: str, slices: int, preset: str, hlo_dir: Path) -> dict:
    """One row: compiled now, or re-accounted from what an earlier compile left in hlo_dir."""
    topo = topology.parse(topo_name, slices)
    path = f"configs/{recipe}.py"
    ov = overrides(config_lib.load(path), topo, preset)
    cfg = config_lib.load(path, ov)
    row = {"recipe": recipe, "topology": topo_name, "slices": slices, "preset": preset, "overrides": ov,
           "batch_size": cfg.train.batch_size}
    base = hlo_dir / key_name(recipe, topo_name, slices, preset)
    meta = Path(f"{base}.meta.json")
    try:
        facts = json.loads(meta.read_text()) if meta.exists() else compile_facts(cfg, topo, base)
    except KslmError as e:
        return dict(row, fits=None, reason=str(e), compile_seconds=0.0)
    if "refusal" in facts:
        return dict(row, fits=False, reason=facts["refusal"], compile_seconds=facts["compile_seconds"])
    with gzip.open(f"{base}.hlo.gz", "rt") as f:
        text = f.read()
    try:
        r = aot.account(cfg, topo, facts, text)
    except aot.DoesNotFit as e:
        return dict(row, fits=False, reason=str(e), compile_seconds=facts["compile_seconds"])
    coll = r["collectives_per_chip"]
    return dict(row, fits=True, memory_gib=r["memory_per_chip"]["total"] / topology.GiB,
                hbm_gib=r["memory_per_chip"]["hbm"] / topology.GiB,
                tflops_chip_compiled=r["flops_per_chip_compiled"] / 1e12,
                tflops_chip_kernels=r["flops_per_chip_kernels"] / 1e12,
                tflops_chip_analytic=r["flops_per_chip_analytic"] / 1e12,
                tflops_chip_attention=r["attention_flops_per_chip_analytic"] / 1e12,
                tflops_chip_xla_once=r["flops_per_chip_xla"] / 1e12,
                hbm_gb_chip=r["bytes_accessed_per_chip"] / 1e9,
                collective_gib_chip=sum(v["bytes"] for v in coll.values()) / topology.GiB,
                collectives={k: v for k, v in coll.items() if v["count"]},
                mfu_serial=r["roofline"]["mfu_serial"], mfu_overlap=r["roofline"]["mfu_overlap"],
                roofline=r["roofline"], state_gib=r["state_bytes_per_chip"] / topology.GiB,
                top_matmuls=r["top_matmuls_per_chip"][:3], loops_counted_once=r["loops_counted_once"],
                compile_seconds=r["compile_seconds"], mesh=r["mesh"])


def _mfu(r: dict) -> str:
    mfu = f"{r['mfu_serial']:.0%}-{r['mfu_overlap']:.0%}, {r['roofline']['bound']}-bound"
    return mfu + (" (counted short)" if "warning" in r["roofline"] else "")


def _topo(r: dict) -> str:
    return f"{r['slices']} x {r['topology']}" if r["slices"] > 1 else r["topology"]


def table(rows: list[dict]) -> str:
    head = ("| recipe | topology | preset | batch | fits | memory/chip GiB | compiled TFLOP/chip (matmuls) "
            "| analytic TFLOP/chip (6N + attention) | compiled / 6N | collectives GiB/chip | est. MFU "
            "(no overlap-full) | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["fits"] and "tflops_chip_compiled" not in r:
            continue   # an old row from the body-once accounting; --reaccount replaces it
        if r["fits"]:
            six_n = r["tflops_chip_analytic"] - r["tflops_chip_attention"]
            lines.append(f"| {r['recipe']} | {_topo(r)} | {r['preset']} | {r['batch_size']} | yes | "
                         f"{r['memory_gib']:.2f} / {r['hbm_gib']:.0f} | {r['tflops_chip_compiled']:.1f} | "
                         f"{six_n:.1f} + {r['tflops_chip_attention']:.1f} | "
                         f"{r['tflops_chip_compiled'] / six_n:.2f} | {r['collective_gib_chip']:.1f} | {_mfu(r)} | "
                         f"{r['compile_seconds']:.0f} |")
        else:
            why = "no" if r["fits"] is False else "refused"
            lines.append(f"| {r['recipe']} | {_topo(r)} | {r['preset']} | {r['batch_size']} | {why}: "
                         f"{r['reason'].split(': ', 1)[-1]} | | | | | | | {r['compile_seconds']:.0f} |")
    best = {}
    for r in rows:
        if r["fits"]:
            if "tflops_chip_compiled" in r and RECIPES.index(r["recipe"]) >= RECIPES.index(best.get(_topo(r), RECIPES[0])):
                best[_topo(r)] = r["recipe"]
    lines += ["", "Largest recipe that fits (of those compiled): "
              + ", ".join(f"{k}: {v}" for k, v in best.items())]
    return "\n".join(lines)


def _ordered(rows: str | None, only: bool) -> list[tuple]:
    first = []
    for item in filter(None, (rows or "").split(",")):
        recipe, _, rest = item.partition("@")
        topo, _, preset = rest.partition(":")
        name, _, slices = topo.partition("x")
        first.append((recipe, name, int(slices or 1), preset or "fsdp"))
    return first if only else first + [k for k in plan() if k not in first]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/tpu_compile.jsonl")
    p.add_argument("--hlo-dir", default=str(Path.home() / ".cache" / "kslm_tpu_compile"),
                   help="where each compile leaves its program text and memory analysis (--reaccount reads them)")
    p.add_argument("--table-only", action="store_true", help="print the table of the rows already measured")
    p.add_argument("--reaccount", action="store_true",
                   help="rebuild every row found in --hlo-dir with the current accounting (no compile), rewrite --out")
    p.add_argument("--only", default=None, help="comma-separated recipes")
    p.add_argument("--rows", default=None,
                   help="run these rows first, in this order: RECIPE@TOPOLOGY[xSLICES]:PRESET, comma-separated "
                        "(e.g. ko_3b@v5e-256x2:fsdp); the rest of the plan follows unless --only-rows")
    p.add_argument("--only-rows", action="store_true", help="run just the --rows")
    args = p.parse_args(argv)
    out = Path(args.out)
    hlo_dir = Path(args.hlo_dir)
    hlo_dir.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.reaccount:
        redone = []
        for r in done:
            key = _key(r)
            have = Path(f"{hlo_dir / key_name(*key)}.meta.json").exists()
            redone.append(measure(*key, hlo_dir) if have else r)
        done = redone
        out.write_text("".join(json.dumps(r) + "\n" for r in done))
    seen = {_key(r) for r in done}
    if not (args.table_only or args.reaccount):
        for key in _ordered(args.rows, args.only_rows):
            if key in seen or (args.only and key[0] not in args.only.split(",")):
                continue
            row = measure(*key, hlo_dir)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    print(table(done))


if __name__ == "__main__":
    main()
