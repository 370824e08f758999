"""`kslm inspect`: the parameters, their shardings and bytes per device on the configured mesh, and the compiled
train step's memory and FLOPs on this machine's devices (`kslm compile`'s step, pointed at the local devices)."""
from __future__ import annotations

from kslm_jax.cli import compile as compile_cmd
from kslm_jax.model import arch
from kslm_jax.train import layout


def run(args, overrides) -> int:
    """Print the report; reads the workdir's config.json (or --config), writes nothing."""
    cfg = compile_cmd.load_config(args.config, args.workdir, overrides, "kslm inspect")
    arch.require_decoder(cfg, "kslm inspect")
    print(layout.format_report(layout.report(cfg)))
    return 0
