"""A jax.profiler trace of chosen training steps (logging.profile_steps), for TensorBoard's Profile tab.

The trace goes to WORKDIR/tensorboard/plugins/profile/<session>/<host>.xplane.pb, beside the run's scalars, so
`tensorboard --logdir WORKDIR/tensorboard` with the profile plugin (tensorboard-plugin-profile, or xprof on its
own) opens both. Each traced step is a StepTraceAnnotation named "train" with its step number, which the
plugin's step-time views group by.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax

from kslm_jax.core import config_checks

log = logging.getLogger("kslm")

STEP_NAME = "train"


def open_command(logdir: Path) -> str:
    return (f"tensorboard --logdir {logdir} --host 127.0.0.1   # the Profile tab; needs "
            "pip install tensorboard-plugin-profile")


class StepProfiler:
    """Starts the trace before step START is dispatched and stops it once step STOP has finished on the device.

    Process 0 traces, or every process with `all_hosts`. A run resumed inside the range traces what is left
    of it; a run that ends or fails inside it stops the trace on the way out (use it as a context manager).
    """

    def __init__(self, logdir: Path, spec: str, all_hosts: bool = False):
        steps = config_checks.profile_steps(spec)
        self.first, self.last = steps or (0, -1)
        self.enabled = steps is not None and (all_hosts or jax.process_index() == 0)
        self.logdir = Path(logdir)
        self.active = False
        self.traced: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop()

    def step(self, step: int):
        """Wrap the dispatch of `step` (1-based): starts the trace at the range's first step, names the step."""
        if self.enabled and not self.active and not self.traced and self.first <= step <= self.last:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        self.traced.append(step)
        return jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)

    def after(self, step: int, out) -> None:
        """After `step` was dispatched: at the range's end, wait for its device work so the trace holds it."""
        if self.active and step >= self.last:
            jax.block_until_ready(out)
            self._stop()

    def _stop(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        log.info("profile of steps %d-%d written under %s; open it with: %s", self.traced[0], self.traced[-1],
                 self.logdir / "plugins" / "profile", open_command(self.logdir))
