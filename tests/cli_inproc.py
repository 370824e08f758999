"""`kslm ARGS` run inside the test process, answering like `subprocess.run(..., capture_output=True, text=True)`.

A `python -m kslm_jax` subprocess spends about two seconds importing Python, JAX and kslm_jax before it reads its
arguments; a test of a refusal needs none of that. What a subprocess gives for free is restored here: the cwd, the
logging and warning setup that `main._setup_logging` changes, and the environment. `_fail` closes fd 2 and calls
os._exit in a real run; here it raises SystemExit instead, and tests/test_cli_errors.py's
test_real_process_fails_in_one_line covers the real path in a subprocess.

What this cannot see: text a C++ library writes straight to fd 2, and anything a thread prints after `main` returns.
Cases about those (orbax writers after a failed save, tensorstore readers) stay subprocesses.
"""
import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

from absl import logging as absl_logging

from kslm_jax.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
_LOGGERS = ("kslm", "absl", "jax._src.xla_bridge", "orbax", "grain")


def _raise_exit(code: int) -> None:
    raise SystemExit(code)


@contextlib.contextmanager
def _isolated():
    """Undo, on the way out, every process-wide change that `kslm_jax.cli.main.main` makes."""
    loggers = {name: logging.getLogger(name) for name in _LOGGERS}
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    env, cwd, hook, verbosity = dict(os.environ), os.getcwd(), sys.unraisablehook, absl_logging.get_verbosity()
    exit_now = cli_main._exit_now
    # Without this, a handler left by an earlier in-process call would send our log lines to that call's stream.
    loggers["kslm"].handlers = []
    cli_main._exit_now = _raise_exit
    os.chdir(REPO)
    try:
        yield
    finally:
        cli_main._exit_now = exit_now
        os.chdir(cwd)
        sys.unraisablehook = hook
        absl_logging.set_verbosity(verbosity)
        for name, (handlers, level, propagate) in saved.items():
            loggers[name].handlers, loggers[name].propagate = handlers, propagate
            loggers[name].setLevel(level)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})


def kslm(*args) -> subprocess.CompletedProcess:
    """Exit code, stdout and stderr of `kslm ARGS`; an exception that escapes `main` becomes exit code 1 and a
    traceback on stderr, as it would in a subprocess."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _isolated(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main.main(argv)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
        except Exception:  # noqa: BLE001 - reported the way the interpreter would report it
            traceback.print_exc(file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess(["kslm", *argv], code, out.getvalue(), err.getvalue())
