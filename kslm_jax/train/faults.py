"""Fault injection for the tests, read from the environment once per run; the loop only asks this seam.

- KSLM_FAULT_SIGTERM_AT_STEP=N: after step N the process sends itself a real signal, SIGTERM or the one named
  by KSLM_FAULT_SIGNAL (INT, KILL, ...).
- KSLM_FAULT_STALL_AT_STEP=N: step N never finishes (the watchdog's case).
- KSLM_FAULT_NAN_AT_STEP=N or N-M: the loss and gradients of step N (of steps N..M) become NaN. Each step is
  poisoned once, so a run sent back to an earlier checkpoint passes it again with good data.
- KSLM_FAULT_OOM=N or N:compile: step N raises XLA's RESOURCE_EXHAUSTED error, as an allocation at run time
  or as the TPU compiler's refusal words it.
"""
from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp

from kslm_jax.core.errors import KslmError


def _steps(spec: str) -> set[int]:
    if not spec.strip() or spec.strip() == "0":
        return set()
    lo, _, hi = spec.partition("-")
    try:
        return set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise KslmError(f"KSLM_FAULT_NAN_AT_STEP={spec!r}: give a step N or a range N-M") from None


class Faults:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.signal_at = int(env.get("KSLM_FAULT_SIGTERM_AT_STEP", "0"))
        self.signal = getattr(signal, "SIG" + env.get("KSLM_FAULT_SIGNAL", "TERM"))
        self.stall_at = int(env.get("KSLM_FAULT_STALL_AT_STEP", "0"))
        self.nan_steps = _steps(env.get("KSLM_FAULT_NAN_AT_STEP", ""))
        oom_step, _, self.oom_phase = env.get("KSLM_FAULT_OOM", "0").partition(":")
        self.oom_step = int(oom_step)

    def step_fn(self, step: int, normal, poisoned):
        """The compiled step to run as `step` (1-based): `normal`, or once per poisoned step `poisoned()`."""
        if step == self.oom_step:
            return self._out_of_memory
        if step in self.nan_steps:
            self.nan_steps.discard(step)
            return poisoned()
        return normal

    def _out_of_memory(self, *args):
        if self.oom_phase == "compile":
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                "Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.")
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 "
                                         "bytes.")

    def after_step(self, step: int) -> None:
        if step == self.signal_at:
            os.kill(os.getpid(), self.signal)
        if step == self.stall_at:
            time.sleep(10**6)


def poison(loss):
    """`loss` with a NaN value and NaN gradients, as a diverged step would give."""
    def poisoned(params, extra, batch, rng, **kwargs):  # kwargs: the LM loss's fp8_meta
        value, aux = loss(params, extra, batch, rng, **kwargs)
        return value * jnp.nan, dict(aux, ce_sum=aux["ce_sum"] * jnp.nan)
    return poisoned


