"""Train on a Cloud TPU pod slice: create it, install kslm_jax on every worker, run `kslm train` on all of
them at once, stream the logs, delete the slice.

    python launch/tpu_pod.py --name kslm-1b --zone us-east5-a --accelerator-type v5p-32 \\
        --runtime-version v2-alpha-tpuv5 --config configs/ko_1b.py --workdir /mnt/gcs/BUCKET/runs/ko1b --dry-run

Before it creates anything, a preflight compiles the train step for the accelerator type on this machine
(`kslm compile`, which needs the `tpu` extra) and stops when the config does not fit a chip's HBM, naming
the lever; --skip-preflight launches anyway.

Every worker runs the same command with KSLM_DISTRIBUTED=1; jax.distributed.initialize() then finds the
slice's topology itself. The workdir must be one folder every worker sees (see launch/README.md).
Commands are built as argv lists by pure functions (`plan`, `build_commands`) and tested in
tests/test_launch.py; they were never run against real TPUs from this repository.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_DIR = "kslm"        # on each worker, relative to the ssh user's home
REMOTE_VENV = "kslm-venv"  # likewise; the package needs Python >= 3.11, newer than some TPU images ship
SOURCES = ("pyproject.toml", "README.md", "kslm_jax", "configs")  # what `--package .` copies
JAX_TPU = "pip install -q -U 'jax[tpu]'"  # libtpu comes from PyPI for the jax versions the package needs
GCSFUSE_APT = ("https://packages.cloud.google.com/apt", "https://packages.cloud.google.com/apt/doc/apt-key.gpg")
POLL_SECONDS = 30
BAD_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU (and queued resource) name, e.g. kslm-1b")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v5litepod-16, v6e-16")
    p.add_argument("--runtime-version", required=True, help="TPU software version, e.g. v2-alpha-tpuv5")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    p.add_argument("--queued", action="store_true", help="request through queued resources and wait for ACTIVE")
    p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible")
    p.add_argument("--reuse", action="store_true", help="use an existing TPU of this name: skip creation")
    p.add_argument("--workdir", required=True, help="the run's folder, the same path on every worker")
    p.add_argument("--config", help="recipe file or name; omit to use the workdir's config.json")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable; passed as --config.SECTION.KEY=VALUE")
    p.add_argument("--package", default=".",
                   help="'.' (default): copy this checkout and pip install -e it; otherwise a pip requirement")
    p.add_argument("--python", help="interpreter for the workers' venv (default: the first of python3, python3.13, "
                   "python3.12, python3.11 that is >= 3.11, else python3.11 from apt)")
    p.add_argument("--gcsfuse", metavar="BUCKET",
                   help="mount gs://BUCKET at /mnt/gcs/BUCKET on every worker (installs gcsfuse if absent)")
    p.add_argument("--setup-command", action="append", default=[], metavar="CMD",
                   help="shell command run on every worker before installing (e.g. mount a bucket); repeatable")
    p.add_argument("--skip-preflight", action="store_true",
                   help="do not compile the config for --accelerator-type on this machine before creating the TPU")
    p.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
        p.error(f"--name {args.name!r}: lowercase letters, digits and '-', starting with a letter")
    if args.gcsfuse and not re.fullmatch(r"[a-z0-9][-_.a-z0-9]*[a-z0-9]", args.gcsfuse):
        p.error(f"--gcsfuse {args.gcsfuse!r}: a bucket name: lowercase, without gs://")
    for item in args.override:
        key = item.partition("=")[0]
        if "=" not in item or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", key):
            p.error(f"--override {item!r}: expected SECTION.KEY=VALUE")
    return args


def _gcloud(args, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, "--zone", args.zone]
    return cmd + (["--project", args.project] if args.project else [])


def _ssh(args, remote: str) -> list[str]:
    return _gcloud(args, "tpu-vm", "ssh", args.name) + ["--worker=all", "--command", remote]


def remote_config(args) -> tuple[str | None, str | None]:
    """The --config value the workers see, and the local file to copy to them first (or None)."""
    if args.config is None:
        return None, None
    local = Path(args.config)
    if not local.is_file():
        return args.config, None  # a recipe name (tiny_ko) or a path that exists on the workers
    full = local.resolve()
    if args.package == "." and full.is_relative_to(REPO / "configs"):
        return full.relative_to(REPO).as_posix(), None  # copied with the checkout
    return full.name, str(full)


def train_command(args) -> str:
    """The shell command every worker runs: the same `kslm train` everywhere, user values quoted."""
    config, _ = remote_config(args)
    kslm = ["train"] + (["--config", config] if config else [])
    kslm += [f"--config.{item}" for item in args.override] + ["--workdir", args.workdir]
    return (f"cd {REMOTE_DIR} && env KSLM_DISTRIBUTED=1 PYTHONUNBUFFERED=1 "
            f"../{REMOTE_VENV}/bin/kslm {shlex.join(kslm)}")


def preflight_command(args) -> list[str]:
    """`kslm compile` here, for the slice about to be created: the config's fit is known before any cost."""
    source = ["--config", args.config] if args.config else ["--workdir", args.workdir]
    return [sys.executable, "-m", "kslm_jax", "compile", *source, *[f"--config.{item}" for item in args.override],
            "--topology", args.accelerator_type]


def gcsfuse_commands(bucket: str) -> list[str]:
    """Install gcsfuse if absent (Google's apt repository) and mount the bucket at /mnt/gcs/BUCKET."""
    apt = "sudo apt-get -o DPkg::Lock::Timeout=600 -qq"
    repo, key = GCSFUSE_APT
    source = f'"deb [signed-by=/usr/share/keyrings/cloud.google.asc] {repo} gcsfuse-$(lsb_release -cs) main"'
    mnt = f"/mnt/gcs/{bucket}"
    return [f"command -v gcsfuse >/dev/null || {{ echo {source} | sudo tee "
            f"/etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL {key} | sudo tee "
            f"/usr/share/keyrings/cloud.google.asc >/dev/null && {apt} update && {apt} install -y gcsfuse; }}",
            f'sudo mkdir -p {mnt} && sudo chown "$USER" {mnt}',
            f"mountpoint -q {mnt} || gcsfuse --implicit-dirs {bucket} {mnt}"]


def setup_command(args) -> str:
    """Mount, user setup, a venv on Python >= 3.11 (some TPU images ship 3.10), jax[tpu]; safe to repeat."""
    venv, apt = REMOTE_VENV, "sudo apt-get -o DPkg::Lock::Timeout=600 -qq"
    mount = gcsfuse_commands(args.gcsfuse) if args.gcsfuse else []
    if args.python:
        pick = f"PY={shlex.quote(args.python)}"
    else:
        pick = ("PY=; for p in python3 python3.13 python3.12 python3.11; do command -v $p >/dev/null && "
                "$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && PY=$p && break; done; "
                f'if [ -z "$PY" ]; then {apt} update && {apt} install -y python3.11; PY=python3.11; fi')
    venv_cmd = (f'if ! test -x {venv}/bin/pip; then {pick}; "$PY" -m venv {venv} || {{ rm -rf {venv} && '
                f'{apt} update && {apt} install -y "$PY-venv" && "$PY" -m venv {venv}; }}; fi')
    parts = ["set -e", f"mkdir -p {REMOTE_DIR}", *mount, *args.setup_command, venv_cmd, f"{venv}/bin/{JAX_TPU}"]
    return "; ".join(parts)


def install_command(args) -> str:
    if args.package == ".":
        return f"cd {REMOTE_DIR} && ../{REMOTE_VENV}/bin/pip install -q -e ."
    return f"{REMOTE_VENV}/bin/pip install -q -U {shlex.quote(args.package)}"


def plan(args) -> list[tuple[str, list[str]]]:
    """(role, argv) for every step, in order; roles: preflight, create, wait, setup, copy, install, train, delete."""
    steps = [] if args.skip_preflight else [("preflight", preflight_command(args))]
    spot = ["--spot"] if args.spot else []
    if args.queued:
        if not args.reuse:
            steps.append(("create", _gcloud(args, "queued-resources", "create", args.name) + [
                "--node-id", args.name, "--accelerator-type", args.accelerator_type,
                "--runtime-version", args.runtime_version, *spot]))
        steps.append(("wait", _gcloud(args, "queued-resources", "describe", args.name)
                      + ["--format=value(state.state)"]))
    elif not args.reuse:
        steps.append(("create", _gcloud(args, "tpu-vm", "create", args.name) + [
            "--accelerator-type", args.accelerator_type, "--version", args.runtime_version, *spot]))
    steps.append(("setup", _ssh(args, setup_command(args))))
    scp = _gcloud(args, "tpu-vm", "scp") + ["--recurse", "--worker=all"]
    if args.package == ".":
        steps.append(("copy", scp + [str(REPO / s) for s in SOURCES] + [f"{args.name}:{REMOTE_DIR}/"]))
    _, config_file = remote_config(args)
    if config_file:
        steps.append(("copy", scp + [config_file, f"{args.name}:{REMOTE_DIR}/"]))
    steps.append(("install", _ssh(args, install_command(args))))
    steps.append(("train", _ssh(args, train_command(args))))
    if not args.keep:
        if args.queued:
            steps.append(("delete", _gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]))
        else:
            steps.append(("delete", _gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"]))
    return steps


def build_commands(args) -> list[list[str]]:
    return [argv for _, argv in plan(args)]


def wait_active(argv: list[str], run=subprocess.run, sleep=time.sleep) -> None:
    """Poll `queued-resources describe` until the request is ACTIVE; raise if it can no longer become so."""
    while True:
        state = run(argv, check=True, capture_output=True, text=True).stdout.strip()
        print(f"tpu_pod: queued resource state: {state or '?'}", file=sys.stderr, flush=True)
        if state == "ACTIVE":
            return
        if state in BAD_STATES:
            raise RuntimeError(f"queued resource is {state}")
        sleep(POLL_SECONDS)


def execute(steps, run=subprocess.run, sleep=time.sleep) -> int:
    """Run the steps; once creation has succeeded, a failure (or Ctrl-C) still runs the delete step."""
    created = not any(role == "create" for role, _ in steps)  # --reuse: the TPU exists already
    code = 0
    try:
        for role, argv in steps:
            if role == "delete":
                continue
            print(f"tpu_pod: [{role}] {shlex.join(argv)}", file=sys.stderr, flush=True)
            if role == "preflight":
                result = run(argv, check=False)
                if result.returncode:
                    print(f"tpu_pod: preflight: `kslm compile` refused the config for {argv[-1]} (its line is "
                          "above); nothing was created. Fix the config, or pass --skip-preflight",
                          file=sys.stderr, flush=True)
                    return result.returncode
            elif role == "wait":
                wait_active(argv, run, sleep)
            else:
                for attempt in range(3 if role == "setup" else 1):  # new workers may refuse ssh briefly
                    try:
                        run(argv, check=True)
                        break
                    except subprocess.CalledProcessError:
                        if attempt == 2 or role != "setup":
                            raise
                        sleep(POLL_SECONDS)
            created = created or role == "create"
    except (subprocess.CalledProcessError, RuntimeError, KeyboardInterrupt) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
        print(f"tpu_pod: failed: {e!r}", file=sys.stderr, flush=True)
    finally:
        for role, argv in steps:
            if role != "delete":
                continue
            if not created:
                print("tpu_pod: creation did not succeed; deleting nothing", file=sys.stderr)
                break
            print(f"tpu_pod: [delete] {shlex.join(argv)}", file=sys.stderr, flush=True)
            if run(argv, check=False).returncode != 0:
                print(f"tpu_pod: delete failed; delete it by hand: {shlex.join(argv)}", file=sys.stderr)
                code = code or 1
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for _, cmd in steps:
            print(shlex.join(cmd))
        if args.queued:
            print("# (the describe command is repeated every 30 s until it prints ACTIVE)", file=sys.stderr)
        return 0
    return execute(steps)


if __name__ == "__main__":
    sys.exit(main())
