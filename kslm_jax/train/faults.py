"""Fault injection for the tests, read from the environment once per run; the loop only asks this seam.

- KSLM_FAULT_SIGTERM_AT_STEP=N: after step N the process sends itself a real signal, SIGTERM or the one named
  by KSLM_FAULT_SIGNAL (INT, KILL, ...).
- KSLM_FAULT_STALL_AT_STEP=N: step N never finishes (the watchdog's case).
- KSLM_FAULT_NAN_AT_STEP=N or N-M: the loss and gradients of step N (of steps N..M) become NaN. Each step is
  poisoned once, so a run sent back to an earlier checkpoint passes it again with good data.
"""
from __future__ import annotations

import os
import signal
import time

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

    def step_fn(self, step: int, normal, poisoned):
        """The compiled step to run as `step` (1-based): `normal`, or once per poisoned step `poisoned()`."""
        if step in self.nan_steps:
            self.nan_steps.discard(step)
            return poisoned()
        return normal

    def after_step(self, step: int) -> None:
        if step == self.signal_at:
            os.kill(os.getpid(), self.signal)
        if step == self.stall_at:
            time.sleep(10**6)


def poison(loss):
    """`loss` with a NaN value and NaN gradients, as a diverged step would give."""
    def poisoned(params, extra, batch, rng):
        value, aux = loss(params, extra, batch, rng)
        return value * jnp.nan, dict(aux, ce_sum=aux["ce_sum"] * jnp.nan)
    return poisoned


