"""Orbax checkpoints of the train state and the data iterator, saved asynchronously, newest N kept.

A step directory counts only once orbax has committed it (written under a temporary name, then renamed);
restore takes the newest committed step and falls back to older ones if a newer one cannot be read.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kslm_jax.core.errors import KslmError

log = logging.getLogger("kslm")


class DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's checkpoint handler for the data iterator (one `process_<i>-of-<n>.json` per process, written
    and read by grain), plus what a run resumed under another process count needs.

    When this process's own file is missing, a multi-stream iterator (`data.streams`, whose state is
    {"streams": {id: grain state}}) gathers its streams from every process's file; any other iterator is
    the same on every process (each builds the global batch and keeps its rows) and takes process 0's file.
    """

    def save(self, directory, item=None, args=None):
        item = item or args.item
        if isinstance(item, grain.DatasetIterator):
            return super().save(directory, item=item)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # an iterator of our own
        (directory / name).write_text(json.dumps(item.get_state(), indent=1))

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        try:
            return self._restore(directory, item)
        except (KeyError, TypeError, IndexError) as e:  # a state of another shape: another loader wrote it
            raise ValueError(f"the data iterator state in {directory} does not fit this run's data pipeline "
                             f"({type(e).__name__}: {e}); it was written by another version of the loader") from None

    def _restore(self, directory, item):
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists() and isinstance(item, grain.DatasetIterator):
            return super().restore(directory, item=item)
        found = sorted(directory.glob("process_*-of-*.json"),
                       key=lambda p: (not p.name.startswith("process_0-"), p.name))
        if not found:
            raise ValueError(f"no data iterator state in {directory}")
        states = [json.loads(f.read_text()) for f in ([own] if own.exists() else found)]
        if "streams" in states[0]:
            merged = {}
            for st in states:
                merged.update(st.get("streams", {}))
            item.set_state({"streams": merged})
        else:
            if not own.exists():
                log.info("data iterator: %s is missing; using %s (every process's state is the same)",
                         own.name, found[0].name)
            item.set_state(states[0])
        return item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def manager(directory: Path, ccfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ccfg.keep,
        enable_async_checkpointing=ccfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = DataSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


CHECKSUMS = "kslm_checksums.json"


def _crc_files(step_dir: Path) -> dict:
    out = {}
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        crc = 0
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
        out[str(f.relative_to(step_dir))] = [f.stat().st_size, f"{crc:08x}"]
    return out


def seal(mngr: ocp.CheckpointManager) -> None:
    """Record size and CRC32 of every file of each finished step, so later damage is caught on restore.

    Orbax's commit marker says a save completed; it cannot tell a file truncated or rewritten afterwards.
    Runs between steps and costs a directory listing unless a new step has finished saving.
    """
    if jax.process_index() != 0 or mngr.is_saving_in_progress():
        return
    for step in mngr.all_steps():
        step_dir = Path(mngr.directory) / str(step)
        target = step_dir / CHECKSUMS
        if step_dir.is_dir() and not target.exists():
            tmp = step_dir / f".{CHECKSUMS}.tmp"
            tmp.write_text(json.dumps(_crc_files(step_dir)))
            tmp.replace(target)


def verify(step_dir: Path) -> None:
    """Raise ValueError naming the first damaged file of a sealed step (unsealed steps pass)."""
    target = step_dir / CHECKSUMS
    if not target.exists():
        return
    want = json.loads(target.read_text())
    have = _crc_files(step_dir)
    for name, (size, crc) in want.items():
        if name not in have:
            raise ValueError(f"file {name} is missing")
        if have[name][0] != size:
            raise ValueError(f"file {name} has {have[name][0]} bytes, {size} were written")
        if have[name][1] != crc:
            raise ValueError(f"file {name} does not match its checksum")


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """One step, checked against its manifest, into the shardings of `abstract_state`."""
    step_dir = Path(mngr.directory) / str(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    # Imported weights (kslm import) carry no iterator state: the data then starts at its beginning.
    if data_iter is not None and (step_dir / "data").is_dir():
        args["data"] = DataRestore(data_iter)
    verify(step_dir)
    return mngr.restore(step, args=ocp.args.Composite(**args))["state"]


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
    """Restore the newest readable step into the shardings of `abstract_state`; (None, None) if none."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, _restore_step(mngr, step, abstract_state, data_iter)
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
            log.warning("checkpoint step %d is damaged or unreadable (%s); trying an older one", step, _first_line(e))
    if steps:
        raise KslmError(f"no checkpoint in {mngr.directory} could be restored (steps {steps}); "
                        "move the folder aside to start over")
    return None, None


def restore_params(directory: Path, abstract_state, step: int | None = None):
    """The newest checkpoint's state (or exactly `step`'s, with no fallback) without the data iterator
    (eval, generate, export, a distillation teacher)."""
    with ocp.CheckpointManager(Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        if step is None:
            step, state = restore_latest(mngr, abstract_state, None)
        else:
            have = sorted(mngr.all_steps())
            if step not in have:
                raise KslmError(f"checkpoint step {step} is not in {directory} (it has {have or 'none'})")
            try:
                state = _restore_step(mngr, step, abstract_state, None)
            except Exception as e:  # noqa: BLE001 - a damaged step is a user-facing condition, not a crash
                raise KslmError(f"checkpoint step {step} in {directory} is damaged or unreadable "
                                f"({_first_line(e)})") from None
    if step is None:
        raise KslmError(f"no checkpoint in {directory}; train first with `kslm train`")
    return step, state
