"""Metric writers (TensorBoard via tensorboardX, JSON lines, terminal), throughput and MFU."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax


def _import_tensorboardx():
    """tensorboardX's writer imports torch whenever it is installed (the export extra brings it), only to accept
    torch tensors, which we never log: that cost 1.2 s and ~200 MB in every `kslm` process (`kslm --help` took
    4.3 s with it). torch is hidden while tensorboardX imports (a None entry makes `import torch` raise
    ImportError), then unhidden, so the exporters still import it; a process that imported torch keeps it."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        import tensorboardX
        import tensorboardX.summary
    finally:
        if hide:
            del sys.modules["torch"]
    return tensorboardX.SummaryWriter, tensorboardX.summary.hparams


SummaryWriter, hparams_summary = _import_tensorboardx()

# Dense bf16 peak TFLOP/s per device, from vendor datasheets (no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L4": 121.0, "A10G": 125.0, "V100": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def device_peak_tflops(override: float = 0.0) -> float | None:
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_TFLOPS[name]
    return None


class Writer:
    """Writes scalars to TensorBoard event files and metrics.jsonl; only process 0 writes."""

    def __init__(self, workdir: Path, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if not self.active:
            return
        if tensorboard:
            self.tb = SummaryWriter(logdir=str(Path(workdir) / "tensorboard"), flush_secs=30)
        self.jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, values: dict) -> None:
        if not self.active:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.active and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Board:
    """A TensorBoard run of its own, WORKDIR/tensorboard/<run>, for what is not the trainer's step scalars:
    a run per source keeps each event file written by one writer (TensorBoard follows one file a folder), and
    lets a baseline share the model's tag: the `unigram` run's eval/bits_per_char draws on the same chart.
    Only process 0 writes."""

    def __init__(self, workdir: Path, run: str, enabled: bool = True):
        self.tb = None
        if enabled and jax.process_index() == 0:
            self.tb = SummaryWriter(logdir=str(Path(workdir) / "tensorboard" / run), flush_secs=10)

    def scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def hparams(self, config_flat: dict, metrics: dict, step: int) -> None:
        """The HParams plugin's session: every config key (non-scalar values as text) and the final metrics,
        which are also written as scalars of this run, where the plugin reads them."""
        if self.tb is None:
            return
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config_flat.items()}
        for summary in hparams_summary(values, metrics):
            self.tb.file_writer.add_summary(summary)
        self.scalars(step, metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, flops_per_token: float, n_devices: int, peak_tflops: float | None):
        self.fpt, self.n, self.peak = flops_per_token, n_devices, peak_tflops
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict:
        now = time.perf_counter()
        dt, tokens = max(now - self.t0, 1e-9), self.tokens
        self.t0, self.tokens = now, 0
        out = {"tokens_per_sec": tokens / dt}
        if self.peak:
            out["mfu"] = tokens * self.fpt / dt / (self.n * self.peak * 1e12)
        return out
