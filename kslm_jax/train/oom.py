"""Out of device memory in the training loop: what did not fit, against what the device has, and the lever.

XLA reports an allocation it cannot make as RESOURCE_EXHAUSTED, from the compiler (TPU: "Ran out of memory in
memory space hbm ... Used 20.5G of 15.75G hbm") or at run time ("Out of memory while trying to allocate N
bytes"). The loop turns either into one paragraph and exit code 4: the compiled step's memory (the
compiler's figures, or its memory analysis) against the device's memory, the state's largest buffers,
the device memory profile saved at run time (pprof format) and the one config change to try first.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from kslm_jax.core import checkpoint
from kslm_jax.core.errors import KslmError
from kslm_jax.train import aot
from kslm_jax.train import topology as topo_lib

log = logging.getLogger("kslm")

EXIT_CODE = 4
GiB = topo_lib.GiB
_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory", "Ran out of memory", "out of memory")


class OutOfMemory(KslmError):
    """A step that does not fit the device; the CLI prints the paragraph and exits with EXIT_CODE."""
    exit_code = EXIT_CODE


def is_oom(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(m in str(e) for m in _MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False


def phase(e: BaseException) -> str:
    """"compile" when the compiler refused the program, else "run" (an allocation while it ran)."""
    text = str(e)
    return "compile" if "compil" in text.lower() or "memory space" in text else "run"


def lever(cfg, mesh_shape: dict, state_bytes: float, limit: float | None) -> str:
    """The first change to try, with its exact override: shard the state, recompute activations, or split
    the batch into more micro-batches (same global batch, same result)."""
    m, t = cfg.mesh, cfg.train
    data, fsdp = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1)
    if limit and state_bytes > 0.5 * limit and data > 1:
        rules = " --config.mesh.rules=fsdp" if m.rules == "dp" else ""
        return (f"parameters and optimizer state alone take {size(state_bytes)} per device: shard them over "
                f"the data-parallel devices too, --config.mesh.fsdp={fsdp * data} --config.mesh.data=1{rules}")
    if cfg.model.remat == "none":
        return "recompute activations in the backward pass instead of storing them: --config.model.remat=dots"
    rows = t.batch_size // (2 * t.grad_accum) if t.batch_size % (2 * t.grad_accum) == 0 else 0
    if rows and rows % (data * fsdp) == 0:
        return (f"halve the micro-batch, keeping the global batch of {t.batch_size}: "
                f"--config.train.grad_accum={2 * t.grad_accum}")
    if cfg.model.remat == "dots":
        return "recompute everything in the backward pass: --config.model.remat=full"
    return f"lower the global batch: --config.train.batch_size={max(t.batch_size // 2, 1)}"


def explain(trainer, e: BaseException) -> str:
    """The paragraph for an out-of-memory `e` raised while `trainer` ran; saves the memory profile at run time.
    A failure while writing it still ends the run as out of memory, with XLA's own line."""
    try:
        return _explain(trainer, e)
    except Exception as err:  # noqa: BLE001 - the report is an aid; the verdict stands without it
        return (f"out of device memory: {str(e).strip().splitlines()[0][:300]} (no report: "
                f"{type(err).__name__}: {err})")


def _explain(trainer, e: BaseException) -> str:
    step, batch = trainer.oom_context
    when = phase(e)
    devices = [d for d in trainer.mesh.devices.flat if d.process_index == jax.process_index()]
    limit = device_limit(devices[0])
    state = aot.state_bytes_per_device(trainer.abstract)
    at = f" in step {step}" if step else ""
    parts = [f"out of device memory at {when} time{at} on {len(devices)} x {devices[0].device_kind} "
             f"(mesh {dict(trainer.mesh.shape)})"]
    need = aot.compiler_oom_sizes(str(e)) if when == "compile" else None
    limit = limit or (need[1] if need else None)
    memory = None if need or batch is None else compiled_memory(trainer, batch)
    have = size(limit) if limit else "an unknown amount (the device reports no limit)"
    if need:
        parts.append(f"the compiler needs {size(need[0])} per device of the {size(need[1])} it has")
    elif memory:
        parts.append(f"the compiled step needs {size(memory['total'])} per device (arguments "
                     f"{size(memory['arguments'])}, outputs {size(memory['outputs'])}, temporaries "
                     f"{size(memory['temporaries'])}) against {have}")
    else:
        parts.append(f"XLA said: {str(e).strip().splitlines()[0][:300]}")
    parts.append(f"parameters and optimizer state take {size(state)} per device")
    if when == "run":
        big = largest_buffers(trainer.state)
        if big:
            parts.append("the largest state buffers per device: " + ", ".join(big))
        saved = save_profile(trainer.workdir, step)
        parts.append(f"device memory profile: {saved} (open with: pprof -http=:8080 {saved})" if saved else
                     "the device memory profile could not be saved")
    parts.append("to fit, " + lever(trainer.cfg, dict(trainer.mesh.shape), state, limit)
                 + ", then run the same command to resume from the last checkpoint")
    note = allocator_note(devices[0], os.environ)
    return "; ".join(parts + ([note] if note else []))


def allocator_note(device, env) -> str | None:
    """On a GPU, jax's allocator takes 75% of the card unless told otherwise, so a step that would fit the card
    fails. GPT-2 XL at batch 16 with remat none peaks at 61.3 GiB on an H100, past the 59.7 GiB that 75% leaves
    of its 79.6, and ran with 0.95 (benchmarks/README.md, sixth push)."""
    if getattr(device, "platform", "") != "gpu" or "XLA_PYTHON_CLIENT_MEM_FRACTION" in env:
        return None
    if env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
        return None
    return ("jax's GPU allocator holds 75% of the card by default: before trying the change above, run with "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 if nothing else uses this GPU")


def size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def device_limit(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def compiled_memory(trainer, batch) -> dict | None:
    """The memory analysis of the step that ran out, compiled again for the same shapes (nothing allocated)."""
    try:
        with jax.set_mesh(trainer.mesh):
            abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
            return aot.memory_of(trainer.train_step.lower(trainer.abstract, abstract_batch, trainer.extra).compile())
    except Exception as err:  # noqa: BLE001 - the report goes on without it
        log.warning("could not compile the step again for its memory analysis: %s", str(err).splitlines()[0][:200])
        return None


def largest_buffers(state, n: int = 3) -> list[str]:
    """'name dtype[shape] size' of the biggest per-device shards among the state's arrays still alive."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(x, jax.Array) or x.is_deleted():
            continue
        shard = x.sharding.shard_shape(x.shape)
        nbytes = aot.shard_bytes(x)
        name = checkpoint.leaf_name(path)
        out.append((nbytes, f"{name} {x.dtype}[{','.join(map(str, shard))}] {size(nbytes)}"))
    return [s for _, s in sorted(out, key=lambda t: -t[0])[:n]]


def save_profile(workdir, step) -> Path | None:
    """jax.profiler's device memory profile (pprof) under WORKDIR/memory/, one file per process."""
    name = f"oom_step{step or 0}" + (f"_process{jax.process_index()}" if jax.process_count() > 1 else "") + ".prof"
    path = Path(workdir) / "memory" / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        jax.profiler.save_device_memory_profile(str(path))
    except Exception as err:  # noqa: BLE001 - a backend without memory profiles, a full disk
        log.warning("could not save the device memory profile to %s: %s", path, err)
        return None
    return path

