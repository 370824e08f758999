"""`kslm compile`: the train step compiled for a Cloud TPU topology from any machine, with the fit verdict."""
from __future__ import annotations

import json
from pathlib import Path

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import arch
from kslm_jax.train import aot, topology

EXIT_DOES_NOT_FIT = 2


def load_config(config_path: str | None, workdir: str | None, overrides, command: str = "kslm compile"):
    """The recipe (+ overrides), else the workdir's config.json; compile (and inspect) never write a config."""
    if config_path is None:
        if workdir is None or not (Path(workdir) / "config.json").is_file():
            raise KslmError(f"{command} needs --config FILE (or a --workdir holding config.json)")
        cfg = config_lib.read_workdir_config(workdir)
        for item in overrides:
            config_lib.apply_override(cfg, item)
        config_lib.validate(cfg)
        return cfg
    return config_lib.load(config_path, overrides)


def run(args, overrides) -> int:
    """Compile, print the per-chip report, write WORKDIR/compile.json; a config that does not fit raises
    aot.DoesNotFit (the CLI prints its one line and exits 2) after writing the verdict too."""
    cfg = load_config(args.config, args.workdir, overrides)
    arch.require_decoder(cfg, "kslm compile")
    topo = topology.parse(args.topology, args.slices)
    if cfg.mesh.slices != topo.slices:
        config_lib.apply_override(cfg, f"mesh.slices={topo.slices}")
    try:
        report = aot.compile_report(cfg, topo)
    except aot.DoesNotFit as e:
        _write(args.workdir, {"topology": topo.name, "slices": topo.slices, "fits": False, "reason": str(e)})
        raise
    print(aot.format_report(report))
    _write(args.workdir, report)
    return 0


def _write(workdir, report: dict) -> None:
    if workdir is None:
        return
    out = Path(workdir) / "compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.atomic_write_text(out, json.dumps(report, indent=2))
