"""When to stop for a signal, decided the same way on every process, so that all hosts save the same step.

One process: SIGTERM and SIGINT set a flag the loop reads between steps (never mid-step or mid-save).

Several processes (a pod): a SIGTERM may reach one host only, or reach hosts at different steps; each
stopping on its own flag would save different steps, and the collective save would hang. SIGTERM is then
left to JAX's preemption service, which jax.distributed.initialize starts: its notifier catches the
signal, and orbax's multihost.reached_preemption(step) turns true on every process at the same step.
SIGINT (an interactive interrupt, which reaches every local process) keeps the local flag.
"""
from __future__ import annotations

import logging
import signal

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("kslm")


def synchronized() -> bool:
    """True when SIGTERM goes through JAX's preemption service (several processes, service enabled)."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopSignal:
    """Context manager; `check(step)` is called once per loop iteration by every process with the same steps."""

    def __init__(self):
        self.received = None
        self.synced = synchronized()
        self._old = {}

    def __enter__(self):
        # With the preemption service a Python SIGTERM handler would replace its notifier's.
        signals = (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def check(self, step: int) -> bool:
        """Whether to stop before the next step; with several processes, true at the same step on all of them."""
        if self.received is None and self.synced and ocp.multihost.reached_preemption(step):
            self.received = "SIGTERM"
            log.info("preemption notice: every process stops after step %d", step)
        return self.received is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
