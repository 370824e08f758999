"""Seconds to build a fresh train state (state_lib.create: the jitted initializer), split into trace+lower,
compile and run, printed as a table. Every `kslm train` from scratch pays this before its first step.

    python benchmarks/init_time.py --preset gpt2-124m --override model.scan_layers=false
    python benchmarks/init_time.py --config configs/tiny_ko.py
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

import train_throughput  # noqa: E402
from kslm_jax.core import sharding  # noqa: E402
from kslm_jax.model import arch  # noqa: E402
from kslm_jax.train import optim  # noqa: E402
from kslm_jax.train import state as state_lib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--preset", choices=sorted(train_throughput.PRESETS), default=None)
    ap.add_argument("--override", action="append", default=[])
    cfg = train_throughput.build_config(ap.parse_args())
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules)
    _, model = arch.from_config(cfg)
    tx, _ = optim.make(cfg.optim, 1000)
    _, shardings = state_lib.abstract_and_shardings(model, tx, 0, mesh, rules)
    rows = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t = time.perf_counter()
        lowered = state_lib.jitted_init(model, tx, 0, shardings).lower()
        rows.append(("trace + lower", time.perf_counter() - t))
        t = time.perf_counter()
        compiled = lowered.compile()
        rows.append(("compile", time.perf_counter() - t))
        t = time.perf_counter()
        jax.block_until_ready(compiled())
        rows.append(("run", time.perf_counter() - t))
    hlo = compiled.as_text()
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; optimized HLO "
          f"{hlo.count(chr(10)):,} lines, {len(re.findall(r' dot[(]', hlo))} dots")
    for name, s in rows:
        print(f"{name:<16s}{s:>8.1f} s")


if __name__ == "__main__":
    main()
