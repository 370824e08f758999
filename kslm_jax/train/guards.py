"""What ends a run cleanly instead of killing it mid-step: a stalled step, a full disk (signals: train/preemption.py)."""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("kslm")


class Watchdog:
    """Ends the process with exit code 3 when no step completes for `timeout_s` seconds.

    A hung collective or a dead host otherwise blocks forever; exiting lets the cluster scheduler restart
    the job, which resumes from the newest checkpoint. Armed only after the first step, so compilation
    does not count.
    """

    EXIT_CODE = 3

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.step = None
        self.last = time.monotonic()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="kslm-watchdog").start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if self.step is not None and idle > self.timeout_s:
                log.error("watchdog: step %d stalled: no step finished for %.0fs (train.step_timeout_s=%g); "
                          "exiting with code %d so the scheduler can restart from the last checkpoint",
                          self.step + 1, idle, self.timeout_s, self.EXIT_CODE)
                logging.shutdown()
                os._exit(self.EXIT_CODE)


def disk_full(e: BaseException) -> bool:
    """Orbax reports ENOSPC from its writer threads as ValueError text; plain writes raise OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (28, 122):
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
