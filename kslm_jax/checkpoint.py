"""Orbax checkpoints of the train state and the data iterator, saved asynchronously, newest N kept.

A step directory counts only once orbax has committed it (written under a temporary name, then renamed);
restore takes the newest committed step and falls back to older ones if a newer one cannot be read.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kslm_jax.errors import KslmError

log = logging.getLogger("kslm")


class DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator handler (one `process_<i>-of-<n>.json` per process), except that a process whose
    own file is missing takes another's, preferring process 0's.

    The pipeline builds the same global stream on every process and only slices each batch, so every
    process's iterator state is identical and a checkpoint resumes under any process count.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not own.exists():
            found = sorted(directory.glob("process_*-of-*.json"),
                           key=lambda p: (not p.name.startswith("process_0-"), p.name))
            if not found:
                raise ValueError(f"no data iterator state in {directory}")
            log.info("data iterator: %s is missing; using %s (every process's state is the same)",
                     own.name, found[0].name)
            own = found[0]
        item.set_state(json.loads(own.read_text()))
        if hasattr(item, "start_prefetch"):
            item.start_prefetch()
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


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
    """Restore the newest readable step into the shardings of `abstract_state`; (None, None) if none."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = DataRestore(data_iter)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
            log.warning("checkpoint step %d cannot be restored (%s: %s); trying an older one",
                        step, type(e).__name__, str(e).splitlines()[0][:200])
            continue
        return step, restored["state"]
    if steps:
        raise KslmError(f"no checkpoint in {mngr.directory} could be restored (steps {steps}); "
                        "move the folder aside to start over")
    return None, None


def restore_params(directory: Path, abstract_state):
    """The newest checkpoint's state without the data iterator (eval, generate, export)."""
    with ocp.CheckpointManager(Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step, state = restore_latest(mngr, abstract_state, None)
    if step is None:
        raise KslmError(f"no checkpoint in {directory}; train first with `kslm train`")
    return step, state
