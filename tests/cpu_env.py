"""The XLA flags of every test process: the suite's own, and each `python -m kslm_jax` that a test starts."""
import os
import subprocess
import sys

# The suite's programs are tiny, so a test's time is mostly XLA compiling them, and on CPU most of that is LLVM
# optimizing code that then runs for milliseconds, and the newer fusion emitters' extra passes. On the 2-core
# machine, tests/test_grad_accum.py took 125 s of CPU with XLA's defaults, 90 s with the first two flags and 47 s
# with all three (a tiny train step: compile 6.6 s -> 1.1 s, each step 51 ms -> 90 ms). The math is unchanged:
# the flags skip optimization passes, not IEEE rules, and the suite's exactness tests pass under them.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
_KNOWN = "KSLM_TEST_FAST_COMPILE"  # the probe's verdict, inherited by xdist workers and subprocesses


def _fast() -> str:
    """FAST_COMPILE where this jaxlib knows its flags, else nothing: XLA aborts a process on an unknown flag,
    and CPU flags come and go between releases, so they are tried once in a child process."""
    if _KNOWN not in os.environ:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
        probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"],
                               env=env, capture_output=True, timeout=300)
        os.environ[_KNOWN] = "1" if probe.returncode == 0 else "0"
    return FAST_COMPILE if os.environ[_KNOWN] == "1" else ""


def flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` fake CPU devices."""
    return " ".join(f for f in (f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "",
                                _fast()) if f)


def one_device_env(fast_compile: bool = True, **extra) -> dict:
    """The environment for a subprocess that runs on one CPU device, like a laptop. fast_compile=False keeps
    XLA's defaults, for a run long enough that its steps cost more than its compiles: `kslm demo`'s 150 steps took
    145 s of CPU with FAST_COMPILE and 97 s without."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra, XLA_FLAGS=flags(1) if fast_compile else "")
