"""The XLA flags of every test process: the suite's own, and each `python -m kslm_jax` that a test starts."""
import os

# The suite's programs are tiny, so a test's time is mostly XLA compiling them, and on CPU most of that is LLVM
# optimizing code that then runs for milliseconds. Without these, tests/test_grad_accum.py took 138 s instead of
# 93 s on the 2-core CI-like machine. Numerics are unchanged: the flags skip optimization passes, not IEEE rules.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}" if devices > 1 else FAST_COMPILE


def one_device_env(**extra) -> dict:
    """The environment for a subprocess that runs on one CPU device, like a laptop."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra, XLA_FLAGS=flags(1))
