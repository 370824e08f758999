"""The workdir holds one run: config.json, tokenizer/, data/, checkpoints/, tensorboard/, eval/.

One command writes to a workdir at a time: `lock` takes an exclusive flock on WORKDIR/.lock for writers
and a shared one for readers; the OS releases it when the holder dies, even by kill -9.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import shutil
import tempfile
from pathlib import Path

from kslm_jax.core import config as config_lib
from kslm_jax.core import distributed
from kslm_jax.core.errors import KslmError


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: a crash leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a run folder is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling folder that replaces `out` only when the block completes.

    A crash, a full disk or a bad record leaves `out` as it was and no partial folder behind, so the next
    stage never reads half an output.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes owner-only folders; a run folder is meant to be shared
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_writable(workdir: Path) -> None:
    if str(workdir).startswith(("gs:/", "s3:/")):
        raise KslmError(f"workdir {workdir}: object-store paths are not supported yet; mount the bucket "
                        "(e.g. gcsfuse) and pass the mounted path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise KslmError(f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir") from None


def bind(workdir: str | os.PathLike, cfg, force: bool = False) -> Path:
    """Make `workdir` hold `cfg`: write config.json, or check it against the one already there.

    A workdir belongs to one run; a config that would change what the run computes is refused with the
    differing keys listed, so an old run's checkpoints are never mixed into a new one. A config.json with
    nothing beside it was left by a command that failed, not by a run, and is simply replaced.
    """
    workdir = Path(workdir)
    ensure_writable(workdir)
    path = workdir / "config.json"
    new = config_lib.to_dict(cfg)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise KslmError(f"{path} is not valid JSON ({e}); restore it or use a new --workdir") from None
        trained = any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
        # A valid config beside nothing else was left by a command that failed: it binds no run.
        diffs = config_lib.breaking_differences(old, new, trained) if is_run(workdir) else []
        if diffs and not force:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise KslmError(f"workdir {workdir} holds another run's config ({shown}); "
                            "use a new --workdir, or pass --force to overwrite its config")
    text = json.dumps(new, indent=2, ensure_ascii=False) + "\n"
    unchanged = path.is_file() and path.read_text(encoding="utf-8") == text
    if distributed.is_primary() and not unchanged:  # in a multi-process job the others only check
        atomic_write_text(path, text)
    return workdir


def config_for(workdir: str | os.PathLike, config_path: str | None, overrides, force: bool = False):
    """The run's config: from --config (+ overrides), else from the workdir's config.json (+ overrides)."""
    workdir = Path(workdir)
    if config_path is None and not (workdir / "config.json").is_file() and is_run(workdir):
        raise KslmError(f"workdir {workdir} has no config.json (it holds {', '.join(_contents(workdir))}); "
                        "restore it, or pass --config with the recipe this run was made with")
    if config_path is None and (workdir / "config.json").is_file():
        cfg = config_lib.read_workdir_config(workdir)
        for item in overrides:
            config_lib.apply_override(cfg, item)
        config_lib.validate(cfg)
    else:
        cfg = config_lib.load(config_path, overrides)
    bind(workdir, cfg, force)
    return cfg


def paths(workdir: str | os.PathLike) -> dict[str, Path]:
    w = Path(workdir)
    return dict(
        clean=w / "data" / "clean",
        tokens=w / "data" / "tokens",
        tokenizer=w / "tokenizer" / "spm.model",
        checkpoints=w / "checkpoints",
        tensorboard=w / "tensorboard",
        metrics=w / "metrics.jsonl",
        eval=w / "eval",
    )


# Files a workdir holds before it holds a run: a config left by a failed command, the lock, a write probe.
_NOT_A_RUN = ("config.json", ".lock")


def _contents(workdir: Path) -> list[str]:
    try:
        return sorted(p.name for p in workdir.iterdir()
                      if p.name not in _NOT_A_RUN and not p.name.startswith((".write-test-", ".config.json.")))
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_run(workdir: str | os.PathLike) -> bool:
    """Whether the workdir holds outputs of a command that succeeded (data, tokenizer, checkpoints, ...)."""
    return bool(_contents(Path(workdir)))


def require_existing(workdir: str | os.PathLike, command: str) -> None:
    w = Path(workdir)
    if not w.is_dir():
        raise KslmError(f"workdir {w} does not exist; check --workdir (runs begin with `kslm prepare`, "
                        f"`kslm import` or `kslm demo`; `kslm {command}` does not create one)")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, exclusive: bool, command: str):
    """Hold WORKDIR/.lock for the block: exclusive for a command that writes the workdir, shared for one
    that reads it. A conflicting holder makes this raise one line naming its PID and host.

    Also undoes what a failed command did to a workdir that held no run: its config.json (and the folder,
    if the command created it) is removed, so the corrected command is not refused as another run's.
    """
    w = Path(workdir)
    created = not w.exists()
    had_config = (w / "config.json").is_file()
    if exclusive:
        ensure_writable(w)
    path = w / ".lock"
    fd = None
    if exclusive:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    elif path.is_file():
        # A reader writes nothing, not even the lock file: every writer creates it, so a workdir without one
        # has no writer to collide with. (O_RDONLY: a read-only mount can still be read.)
        fd = os.open(path, os.O_RDONLY)
    held = False
    try:
        if fd is not None:
            _acquire(fd, path, exclusive, command)
            held = True
        ok = False
        try:
            yield w
            ok = True
        finally:
            if not ok and exclusive and not had_config and not is_run(w):
                (w / "config.json").unlink(missing_ok=True)
                if created:
                    path.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        w.rmdir()
    finally:
        if fd is not None:
            if exclusive and held:  # the next writer finds no stale holder in it
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock


def _acquire(fd: int, path: Path, exclusive: bool, command: str) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = path.read_text(errors="replace").strip() if path.is_file() else ""
        who = holder or "a reading command (eval, generate or export)"
        raise KslmError(f"workdir {path.parent} is in use by {who}; `kslm {command}` "
                        f"{'writes to' if exclusive else 'reads'} it and would collide: wait for that command to "
                        "finish (or stop it), then run this one again") from None
    if exclusive:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"kslm (PID {os.getpid()} on host {socket.gethostname()})\n".encode(), 0)


def disk_full(e: BaseException | None) -> bool:
    """Whether an exception, or one it was raised from, is a full disk: plain writes raise OSError, while
    orbax's writer threads, safetensors and ArrayRecord report it only in their message text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
