"""Run health on the host: counts non-finite steps, flags loss spikes, decides what the loop does next."""
from __future__ import annotations

import logging
import math

log = logging.getLogger("kslm")


class Health:
    """Fed one (step, loss, nonfinite) per step; returns None, "restore", "raise" or "stop".

    Non-finite steps were already kept off the weights by the step itself. A spike is a loss more than
    `zscore` running standard deviations above the running mean (exponential averages, after a warm-up);
    spikes are logged and counted, and with policy "restore" they also send the run back to its last
    checkpoint, as non-finite steps do. "stop" comes after `max_skipped` non-finite steps in a row (0: never):
    a run that skips every step would otherwise end "successfully" with the weights it had long ago.
    """

    def __init__(self, policy: str, zscore: float, warmup: int = 20, beta: float = 0.98, max_skipped: int = 0):
        self.policy, self.zscore, self.warmup, self.beta = policy, zscore, warmup, beta
        self.max_skipped = max_skipped
        self.in_a_row = 0
        self.mean = self.var = 0.0
        self.seen = 0
        self.nonfinite = 0
        self.spikes = 0

    def observe(self, step: int, loss: float, nonfinite: bool) -> str | None:
        if nonfinite or not math.isfinite(loss):
            self.nonfinite += 1
            self.in_a_row += 1
            log.warning("step %d: non-finite loss, gradient or update; the update was skipped (%d so far, "
                        "train.nonfinite=%s)", step, self.nonfinite, self.policy)
            if self.max_skipped and self.in_a_row >= self.max_skipped:
                return "stop"
            return None if self.policy == "skip" else self.policy
        self.in_a_row = 0
        spike = False
        if self.zscore > 0 and self.seen >= self.warmup:
            std = math.sqrt(max(self.var, 1e-12))
            spike = loss > self.mean + self.zscore * std
            if spike:
                self.spikes += 1
                log.warning("step %d: loss spike %.4f against a running mean of %.4f (std %.4f)",
                            step, loss, self.mean, std)
        if not spike:  # spikes stay out of the statistics they are judged against
            self.seen += 1
            if self.seen == 1:
                self.mean = loss
            delta = loss - self.mean
            self.mean += (1 - self.beta) * delta
            self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
        return "restore" if spike and self.policy == "restore" else None

    def scalars(self) -> dict:
        return {"train/nonfinite_steps": self.nonfinite, "train/loss_spikes": self.spikes}
