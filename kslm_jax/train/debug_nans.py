"""Where a non-finite step came from (train.debug_nans): the step re-run op by op under jax_debug_nans.

The compiled step only says that its loss, gradient or update was not finite. Re-run eagerly
(jax.disable_jit) with jax_debug_nans on, JAX checks the output of every operation and raises
FloatingPointError at the first one that makes a NaN, inside the Python frames that called it (Infs are not
chased: softmax makes them on purpose, so jax_debug_infs would stop at the first attention).
Those frames hold the Flax modules (their scope paths) and, for scanned layers, the iteration of the scan
that was running: together they name the operation as `layers_1/self_attn/q_proj`. Parameters that hold
non-finite values are listed first, since no operation can be blamed for them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import source_info_util  # private: where a traced equation came from, for the backward pass

from kslm_jax.core import checkpoint
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")

# How JAX's name stack wraps the scopes (Flax's module names) an operation was traced in: jvp(...), transpose(...)
_TRANSFORMS = re.compile(r"\b(?:jvp|transpose|vmap|remat|checkpoint|rematted_computation)\(")
_KINDS = {"nan": "NaN", "inf": "Inf"}
_OP = re.compile(r"invalid value \((nan|inf)\) encountered in (\S+)")


@dataclasses.dataclass
class Finding:
    step: int
    op: str | None = None           # the primitive, e.g. dot_general
    kind: str | None = None         # nan or inf
    module: str | None = None       # layers_1/self_attn/q_proj
    source: str | None = None       # kslm_jax/model/llama.py:82 (Linear.__call__)
    phase: str | None = None        # forward pass, backward pass, optimizer update
    bad_params: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    failed: str | None = None       # the re-run itself failed (an op with no eager form), and why

    def describe(self) -> str:
        head = f"step {self.step} was not finite"
        if self.bad_params:
            head += "; parameters already holding NaN/Inf before it: " + ", ".join(self.bad_params)
        if self.failed:
            return f"{head}; the op-by-op re-run under jax_debug_nans failed: {self.failed}"
        if self.op is None:
            return (f"{head}; re-run under jax_debug_nans, no operation made a NaN ({self.seconds:.0f} s): "
                    "the compiled step differs from the op-by-op one (fusion, precision) or the fault was injected")
        where = f" in {self.module}" if self.module else ""
        src = f" at {self.source}" if self.source else ""
        return (f"{head}; re-run under jax_debug_nans ({self.seconds:.0f} s), the first {_KINDS[self.kind]} came from "
                f"`{self.op}`{where}{src}, {self.phase}")


def bad_params(params, limit: int = 5) -> list[str]:
    """'path (n of m values, first at [i, ...])' for each parameter holding NaN or Inf, counted on the devices."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        bad = ~jnp.isfinite(x)
        count = int(bad.sum())
        if count:
            first = ", ".join(str(int(i)) for i in jnp.unravel_index(jnp.argmax(bad.ravel()), x.shape))
            name = checkpoint.leaf_name(path)
            out.append(f"{name} ({count} of {x.size} values, first at [{first}])")
    return out[:limit]


def explain(trainer, batch, step: int) -> Finding:
    """Re-run step `step` (already taken, its update skipped) from the state before it on the same batch.

    A skipped step left the parameters and optimizer state as they were, so `trainer.state` with its step
    counter put back is the state the step started from, and the step draws the same random numbers.
    """
    state = trainer.state
    finding = Finding(step=step, bad_params=bad_params(state.params))
    before = state.replace(step=state.step - 1)
    t0 = time.perf_counter()
    log.warning("step %d: re-running it op by op under jax_debug_nans (train.debug_nans=true) ...", step)
    try:
        with jax.set_mesh(trainer.mesh), jax.disable_jit(), jax.debug_nans(True), _unfiltered_tracebacks():
            step_lib.train_step(before, batch, trainer.extra, loss=trainer.objective.loss, tx=trainer.tx,
                                lr_fn=trainer.lr_fn, accum=trainer.cfg.train.grad_accum, rules=trainer.rules)
    except FloatingPointError as e:
        _locate(e, finding)
    except Exception as e:  # noqa: BLE001 - a kernel without an eager form must not hide the step's failure
        finding.failed = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    finding.seconds = time.perf_counter() - t0
    return finding


@contextlib.contextmanager
def _unfiltered_tracebacks():
    """JAX drops its own frames from tracebacks; the scan loop's frame holds the layer index, so keep them."""
    old = jax.config.jax_traceback_filtering
    jax.config.update("jax_traceback_filtering", "off")
    try:
        yield
    finally:
        jax.config.update("jax_traceback_filtering", old)


def _locate(e: FloatingPointError, finding: Finding) -> None:
    m = _OP.search(str(e))
    finding.kind, finding.op = (m.group(1), m.group(2)) if m else ("nan", str(e).split()[-1])
    path, indices, source, phase, name_stack = None, {}, None, "forward pass", None
    tb = e.__traceback__
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module) and module.scope is not None:
            path = tuple(module.scope.path)
        elif code.co_name == "scan" and code.co_filename.endswith("loops.py") and "i" in frame.f_locals and path:
            indices.setdefault(path, int(frame.f_locals["i"]))  # the scan a scanned module runs its layers in
        if "/kslm_jax/" in code.co_filename:
            rel = code.co_filename[code.co_filename.rindex("/kslm_jax/") + 1:]
            source = f"{rel}:{tb.tb_lineno} ({getattr(code, 'co_qualname', code.co_name)})"
        if "backward_pass" in code.co_name:  # the equation being transposed carries its forward op's origin
            phase = "backward pass"
            info = getattr(frame.f_locals.get("eqn"), "source_info", None)
            if info is not None:
                name_stack = _TRANSFORMS.sub("", str(info.name_stack)).replace(")", "").strip("/") or name_stack
                source = _user_frame(info) or source
        if "/optax/" in code.co_filename:
            phase = "optimizer update"
        tb = tb.tb_next
    finding.phase, finding.source = phase, source
    if path:
        finding.module = "/".join(f"{p}_{indices[path[:i + 1]]}" if path[:i + 1] in indices else p
                                  for i, p in enumerate(path))
    elif name_stack:  # an operation of the backward pass: its forward operation's named scopes (Flax's modules)
        finding.module = name_stack


def _user_frame(source_info) -> str | None:
    """'file:line (function)' of the first frame outside JAX that traced an equation (private JAX API: best effort)."""
    try:
        return source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001 - only an enrichment of the message
        return None
