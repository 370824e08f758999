"""Orbax checkpoints of the train state and the data iterator, saved asynchronously; orbax's own policies
decide the cadence (every `checkpoint.every_steps`) and what is kept (the newest `keep`, plus every
`keep_every`-th step).

A step directory counts only once orbax has committed it (written under a temporary name, then renamed);
restore takes the newest committed step and falls back to older ones if a newer one cannot be read.

Sealing: once a save of this process has committed, the size and CRC32 of each of its files are recorded
(kslm_checksums.json), so later damage is caught on restore. A step found on disk unsealed (a kill -9
between commit and seal, or one written by an older version) is never sealed blindly: it is restored only
if orbax can read every array, its shapes match the config and its values are finite, and only then sealed.
A step that fails any check is moved aside (to checkpoints-set-aside/, named in the log) by a writing run,
so it neither shadows the new saves of the same step numbers nor is deleted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import weakref
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

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
    cm = ocp.checkpoint_managers
    # No InitialSavePolicy: a fresh run's first step is not worth a checkpoint of its own.
    saving = cm.AnySavePolicy([cm.FixedIntervalPolicy(ccfg.every_steps), cm.PreemptionCheckpointingPolicy()])
    keeping = [cm.LatestN(ccfg.keep)] + ([cm.EveryNSteps(ccfg.keep_every)] if ccfg.keep_every else [])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=saving,
        preservation_policy=cm.AnyPreservationPolicy(keeping),
        enable_async_checkpointing=ccfg.async_save,
        create=True,
        # A run killed mid-save leaves STEP.orbax-checkpoint-tmp behind. Only writers get here, each holding
        # the workdir's exclusive lock (a sweep trial's folder is run by one process at a time), so no save in
        # progress is removed; readers open the folder read-only and leave such folders alone. orbax removes
        # them in a background thread that its next save waits for.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


# Steps each manager saved itself: only those are sealed without first being read back.
_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, force: bool = False) -> bool:
    """Save `step` when orbax's save policy says it is due (or `force`); True if a save was started.

    A step folder at or above `step` (left by a run whose newer steps were found damaged, or put there by
    someone else) would make orbax refuse the save without a word; it is moved aside first, with a log
    line. A forced save that still does not happen raises instead of letting the caller report it.
    """
    newer = [s for s in mngr.all_steps() if s >= step]
    if newer and jax.process_index() == 0:
        for s in newer:
            set_aside(mngr, s, f"is not older than the step being saved ({step})")
        mngr.reload()
    if not force and not mngr.should_save(step):
        return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = DataSave(data_iter)
    if not mngr.save(step, args=ocp.args.Composite(**args), force=force):
        raise KslmError(f"checkpoint step {step} was not saved in {mngr.directory} (orbax refused it; steps there: "
                        f"{sorted(mngr.all_steps())}); move that folder aside and resume")
    _SAVED.setdefault(mngr, set()).add(step)
    return True


def set_aside(mngr: ocp.CheckpointManager, step: int, why: str) -> Path | None:
    """Move a step folder out of orbax's sight into checkpoints-set-aside/ (never delete it: it may be the
    only copy of something a user wants back). Returns where it went; None on other processes."""
    src = Path(mngr.directory) / str(step)
    if jax.process_index() != 0 or not src.exists():
        return None
    dest = src.parent.parent / f"{src.parent.name}-set-aside" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    while dest.exists():
        dest = dest.with_name(dest.name + "x")
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
    log.warning("checkpoint step %d %s; moved it aside to %s", step, why, dest)
    return dest


CHECKSUMS = "kslm_checksums.json"


def _ours(name: str) -> bool:
    """The seal itself and its temporary files (an interrupted seal leaves `.kslm_checksums.json.tmp`)."""
    return name == CHECKSUMS or name.startswith(f".{CHECKSUMS}")


def _crc_files(step_dir: Path) -> dict:
    out = {}
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file() and not _ours(p.name)):
        crc = 0
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
        out[str(f.relative_to(step_dir))] = [f.stat().st_size, f"{crc:08x}"]
    return out


def _seal_dir(step_dir: Path) -> None:
    target = step_dir / CHECKSUMS
    if not step_dir.is_dir() or target.exists():
        return
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.unlink(missing_ok=True)  # left by a seal that was interrupted: it is not part of the step
    tmp.write_text(json.dumps(_crc_files(step_dir)))
    tmp.replace(target)


def seal(mngr: ocp.CheckpointManager) -> None:
    """Record size and CRC32 of every file of each step this manager saved, once orbax has committed it.

    Orbax's commit marker says a save completed; it cannot tell a file truncated or rewritten afterwards.
    Runs between steps and costs a directory listing unless a new step has finished saving.
    """
    if jax.process_index() != 0 or mngr.is_saving_in_progress():
        return
    mine = _SAVED.get(mngr, set())
    for step in mngr.all_steps():
        if step in mine:
            _seal_dir(Path(mngr.directory) / str(step))


def verify(step_dir: Path) -> None:
    """Raise ValueError naming the first damaged file of a sealed step (unsealed steps pass here; restore
    reads them back in full before trusting them)."""
    target = step_dir / CHECKSUMS
    if not target.exists():
        return
    try:
        want = json.loads(target.read_text())
    except ValueError:
        raise ValueError(f"its seal {CHECKSUMS} is damaged") from None
    have = _crc_files(step_dir)
    for name, (size, crc) in want.items():
        if name not in have:
            raise ValueError(f"file {name} is missing")
        if have[name][0] != size:
            raise ValueError(f"file {name} has {have[name][0]} bytes, {size} were written")
        if have[name][1] != crc:
            raise ValueError(f"file {name} does not match its checksum")


class ShapeMismatch(KslmError):
    """The step is intact but was written for another model shape: the config changed, not the files."""


def _names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def leaf_name(path) -> str:
    """A pytree leaf's path as the reports and errors print it: `layers/mlp/gate_proj/kernel`, `opt_state/0/mu/...`."""
    return "/".join(map(str, _names(path)))


def check_shapes(step_dir: Path, abstract_state) -> set | None:
    """Compare the global shapes orbax recorded for the step's parameters and FP8 meta with the config's,
    before any read; the names of the state's fields the step holds (None: unreadable metadata).

    orbax's own metadata reader, not _METADATA's write_shape: that is one shard's shape under FSDP. A run
    without model.matmul_precision=fp8_delayed has an empty fp8_meta, which a step may hold or, written
    before the field existed, lack.
    """
    def leaves(tree) -> dict:  # {(field, *path): leaf}, parameters named without their "params/"
        return {(*([f] if f != "params" else []), *_names(p)): leaf for f in ("params", "fp8_meta") if f in tree
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree[f], is_leaf=lambda x: hasattr(x, "shape"))[0]}

    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir / "state"))
        tree = meta.tree if hasattr(meta, "tree") else meta
        stored = {key: tuple(m.shape) for key, m in leaves(tree).items()}
    except Exception:  # noqa: BLE001 - unreadable metadata is damage; the restore that follows reports it
        return None
    ours = {key: tuple(leaf.shape) for key, leaf in leaves(vars(abstract_state)).items()}
    name = lambda key: "/".join(map(str, key))  # noqa: E731
    wrong = [f"{name(k)} is missing" if k not in stored else f"{name(k)} is {stored[k]}, the config gives {shape}"
             for k, shape in ours.items() if stored.get(k) != shape]
    wrong += [f"it holds {name(k)}, which this config lacks" for k in stored if k[0] == "fp8_meta" and k not in ours]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ShapeMismatch(f"checkpoint step {step_dir.name} in {step_dir.parent} is intact but was written for "
                            f"another model shape ({shown}); the workdir's config.json no longer matches its "
                            "checkpoints: restore the model.* keys it was trained with, or use a new --workdir")
    return set(tree)


def _finite(state) -> bool:
    leaves = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in leaves]))))


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter, writable: bool = False):
    """One step, checked against its seal (or, if unsealed, read back in full), into the shardings of
    `abstract_state`."""
    step_dir = Path(mngr.directory) / str(step)
    saved = check_shapes(step_dir, abstract_state)
    fields = {f.name for f in dataclasses.fields(abstract_state)} if dataclasses.is_dataclass(abstract_state) else set()
    absent = fields - saved if saved is not None else set()
    # orbax restores only into the tree structure it saved: fields the step predates (empty here, or
    # check_shapes would have refused) are left out of the target and keep their empty values.
    target = {f: getattr(abstract_state, f) for f in fields - absent} if absent else abstract_state
    args = {"state": ocp.args.StandardRestore(target)}
    # Imported weights (kslm import) carry no iterator state: the data then starts at its beginning.
    if data_iter is not None and (step_dir / "data").is_dir():
        args["data"] = DataRestore(data_iter)
    verify(step_dir)
    state = mngr.restore(step, args=ocp.args.Composite(**args))["state"]
    if absent:
        state = dataclasses.replace(abstract_state, **state)
    if not (step_dir / CHECKSUMS).exists():
        if not _finite(state):
            raise ValueError("it is unsealed and holds non-finite parameters")
        if writable and jax.process_index() == 0:  # read back whole and sane: from now on damage is caught
            _seal_dir(step_dir)
    return state


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter, writable: bool = True):
    """Restore the newest readable step into the shardings of `abstract_state`; (None, None) if none.

    A training run (`writable`) moves each unreadable newer step aside, so its next saves of those step
    numbers are not refused by orbax; a reader (eval, export) leaves the folders as they are.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, _restore_step(mngr, step, abstract_state, data_iter, writable)
        except ShapeMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
            why = f"is damaged or unreadable ({_first_line(e)})"
            if writable and set_aside(mngr, step, why + "; trying an older one") is not None:
                mngr.reload()
            else:
                log.warning("checkpoint step %d %s; trying an older one", step, why)
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
            step, state = restore_latest(mngr, abstract_state, None, writable=False)
        else:
            have = sorted(mngr.all_steps())
            if step not in have:
                raise KslmError(f"checkpoint step {step} is not in {directory} (it has {have or 'none'})")
            try:
                state = _restore_step(mngr, step, abstract_state, None)
            except KslmError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged step is a user-facing condition, not a crash
                raise KslmError(f"checkpoint step {step} in {directory} is damaged or unreadable "
                                f"({_first_line(e)})") from None
    if step is None:
        raise KslmError(f"no checkpoint in {directory}; train first with `kslm train`")
    return step, state
