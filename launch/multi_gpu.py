"""Train on several GPUs of one machine: one `kslm train` process that sees all of them.

    python launch/multi_gpu.py --gpus 0,1,2,3 --fsdp 4 --config configs/ko_1b.py --workdir runs/ko1b --dry-run

JAX drives every local GPU from one process, so there is nothing to spawn per GPU: this sets the
environment (which GPUs, XLA's latency-hiding scheduler, NVLink multicast off) and the mesh overrides, then
runs the command once. `build(args, environ)` is pure and tested in tests/test_launch.py.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--fsdp", type=int, help="mesh.fsdp: shard parameters and optimizer state over N GPUs")
    p.add_argument("--tensor", type=int, help="mesh.tensor: tensor-parallel degree M")
    p.add_argument("--workdir", required=True, help="the run's folder")
    p.add_argument("--config", help="recipe file or name; omit to use the workdir's config.json")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable; passed as --config.SECTION.KEY=VALUE")
    p.add_argument("--xla-flag", action="append", default=[], metavar="FLAG",
                   help="an extra XLA flag, repeatable, e.g. --xla-flag=--xla_gpu_enable_command_buffer=")
    p.add_argument("--dry-run", action="store_true", help="print the environment and the command, run nothing")
    args = p.parse_args(argv)
    if args.gpus is not None and not re.fullmatch(r"\d+(,\d+)*", args.gpus):
        p.error(f"--gpus {args.gpus!r}: expected comma-separated indices such as 0,1,2,3")
    for name in ("fsdp", "tensor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.gpus is not None:
        n = len(args.gpus.split(","))
        used = (args.fsdp or 1) * (args.tensor or 1)
        if n % used:
            p.error(f"--fsdp x --tensor = {used} does not divide the {n} GPUs of --gpus {args.gpus}")
    for item in args.override:
        if "=" not in item or "." not in item.partition("=")[0]:
            p.error(f"--override {item!r}: expected SECTION.KEY=VALUE")
    return args


def build(args, environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment variables to set, argv of the one `kslm train` process)."""
    environ = os.environ if environ is None else environ
    env = {}
    if args.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.gpus
    env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast (NVLS) stays off
    flags = environ.get("XLA_FLAGS", "").split()
    flags += [f for f in (*XLA_GPU_FLAGS, *args.xla_flag) if f not in flags]
    env["XLA_FLAGS"] = " ".join(flags)
    argv = ["kslm", "train"] + (["--config", args.config] if args.config else [])
    argv += [f"--config.{item}" for item in args.override]
    if args.fsdp is not None or args.tensor is not None:
        if args.fsdp is not None:
            argv.append(f"--config.mesh.fsdp={args.fsdp}")
        if args.tensor is not None:
            argv.append(f"--config.mesh.tensor={args.tensor}")
        argv.append("--config.mesh.data=-1")  # the rest of the GPUs replicate (data parallel)
    argv += ["--workdir", args.workdir]
    return env, argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env, cmd = build(args)
    if args.dry_run:
        print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *cmd]))
        return 0
    if shutil.which(cmd[0]) is None:  # not on PATH: the same CLI through this interpreter
        cmd = [sys.executable, "-m", "kslm_jax", *cmd[1:]]
    return subprocess.run(cmd, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
