"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from environment variables.

    KSLM_DISTRIBUTED=1          join a multi-process job (implied by KSLM_NUM_PROCESSES > 1)
    KSLM_COORDINATOR=HOST:PORT  process 0's address, reachable from every process
    KSLM_NUM_PROCESSES=N        processes in the job
    KSLM_PROCESS_ID=I           this process's index, 0..N-1
    KSLM_INIT_TIMEOUT=S         seconds to wait for every process to join (default 300)

With KSLM_DISTRIBUTED=1 and none of the other three, JAX detects the cluster itself (Cloud TPU pods,
SLURM, Open MPI). On CPU, cross-process collectives go through gloo. Every process runs the same command
on the same workdir (a shared file system); only process 0 writes config.json, TensorBoard and metrics.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time

from kslm_jax.core.errors import KslmError

log = logging.getLogger("kslm")

_VARS = ("KSLM_COORDINATOR", "KSLM_NUM_PROCESSES", "KSLM_PROCESS_ID")


def _int_env(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise KslmError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise KslmError(f"environment variable {name}={value} must be at least {minimum}")
    return value


def requested() -> bool:
    """Whether the environment asks for a multi-process job."""
    flag = os.environ.get("KSLM_DISTRIBUTED", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag not in ("", "0", "false", "no"):
        raise KslmError(f"environment variable KSLM_DISTRIBUTED={flag!r} must be 0 or 1")
    n = _int_env("KSLM_NUM_PROCESSES", 1)
    return n is not None and n > 1


def initialize_from_env() -> bool:
    """Join the multi-process job the environment describes; False (doing nothing) if it describes none.

    Must run before anything else touches JAX (devices, arrays, jit): the backend is created only once.
    """
    if not requested():
        return False
    import jax
    if jax.distributed.is_initialized():
        return True
    coordinator = os.environ.get("KSLM_COORDINATOR", "").strip() or None
    num_processes = _int_env("KSLM_NUM_PROCESSES", 1)
    process_id = _int_env("KSLM_PROCESS_ID", 0)
    timeout = _int_env("KSLM_INIT_TIMEOUT", 1) or 300
    given = [v for v, x in zip(_VARS, (coordinator, num_processes, process_id)) if x is not None]
    if given and len(given) < len(_VARS):
        missing = ", ".join(v for v in _VARS if v not in given)
        raise KslmError(f"{', '.join(given)} set but {missing} not; set all three, or none to let JAX "
                        "detect the cluster (TPU pods, SLURM)")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise KslmError(f"environment variable KSLM_COORDINATOR={coordinator!r} must be HOST:PORT")
        if process_id >= num_processes:
            raise KslmError(f"environment variable KSLM_PROCESS_ID={process_id} must be below "
                            f"KSLM_NUM_PROCESSES={num_processes}")
        _preflight(host.strip("[]"), int(port), process_id, timeout)
    # The CPU client picks its cross-process collectives when it is created; without them a multi-process
    # CPU computation fails at its first collective. (gloo is the default since jax 0.4.36; this only
    # affects the CPU backend, so it is harmless on GPU and TPU.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        log.info("joining a job of %d processes as process %d via %s (waiting up to %ds for all of them)",
                 num_processes, process_id, coordinator, timeout)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - unreachable coordinator, failed detection, backend already up
        where = (f"coordinator KSLM_COORDINATOR={coordinator} (KSLM_PROCESS_ID={process_id} of "
                 f"KSLM_NUM_PROCESSES={num_processes})" if coordinator else "automatic cluster detection")
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise KslmError(f"jax.distributed.initialize failed with {where}: {type(e).__name__}: {first}") from None
    return True


def _preflight(host: str, port: int, process_id: int, timeout: int) -> None:
    """Catch the two start-up failures that JAX's C++ client reports by killing the process (abort or
    segfault) rather than raising: the coordinator's port already taken, and a coordinator never reached."""
    if process_id == 0:
        # The coordinator service binds [::]:PORT (every address) whatever host KSLM_COORDINATOR names.
        for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((addr, port))
                return
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise KslmError(f"port {port} of KSLM_COORDINATOR is already in use on this host (process 0 "
                                    "runs the coordinator there); pick a free port") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise KslmError(f"cannot reach the coordinator KSLM_COORDINATOR={host}:{port} within {timeout}s "
                                f"({e.strerror or e}); start process 0 there, or check the address and "
                                "KSLM_INIT_TIMEOUT") from None
            time.sleep(0.5)


def is_primary() -> bool:
    """True in a single-process run and in process 0 of a multi-process one (without starting a backend)."""
    import jax
    return not jax.distributed.is_initialized() or jax.process_index() == 0
