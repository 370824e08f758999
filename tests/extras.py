"""Tests that need an optional extra or hardware the machine may lack: every skip in the suite goes through here.

On a bare `pip install -e '.[test]'` a test that needs the export or llama.cpp extra skips and names the extra
to install. Under CI=true (.ci/run sets it) such a test fails instead, and so does any other skip (conftest.py
turns it into a failure), so a CI that lost a package cannot pass with the tests that use it quietly skipped.
Only two kinds of skip stay skips under CI, each declared here by name: tests that need a GPU (CI is CPU only),
and opt-in tests that run only when their environment variable is set.
"""
from __future__ import annotations

import functools
import importlib
import os

import jax
import pytest

# How to install each extra the tests may need; the names are those of pyproject.toml's optional-dependencies.
EXTRAS = {
    "export": "pip install -e '.[export]'",
    "llamacpp": "pip install -e '.[llamacpp]' (a source build; the README's test command sets a small CMAKE_ARGS)",
    "kernels": "pip install -e '.[kernels]'",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@functools.cache
def _import_error(module: str) -> str | None:
    """Why `module` cannot be imported, or None. A real import, not find_spec: a wheel whose shared library
    fails to load (llama_cpp) is as missing as one never installed."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a native library
        return f"{type(e).__name__}: {e}"
    return None


class _Deferred:
    """A module imported on its first attribute access: collection imports every test module in every xdist
    worker, and importing torch, transformers and onnx there cost each worker about 2.7 s, whether or not it
    ran a test that uses them."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(importlib.import_module(self._module), name)


def optional(module: str):
    """`module` for the module-level names of tests marked with `needs`: imported when a test first uses it,
    which a test that lacks it never does (`needs` skips or fails it first)."""
    return _Deferred(module)


def needs(extra: str, *modules: str) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) that needs `modules` from the optional `extra`."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; pyproject.toml's extras used by tests: {', '.join(EXTRAS)}")
    if not modules:
        raise ValueError("name the modules the test imports, so a partial install is caught")
    return pytest.mark.extra(extra, *modules)


def check(item: pytest.Item) -> None:
    """Skip `item` naming the extra it needs, or fail it under CI; called from conftest's runtest_setup."""
    for mark in item.iter_markers("extra"):
        extra, *modules = mark.args
        missing = {m: err for m in modules if (err := _import_error(m))}
        if not missing:
            continue
        why = "; ".join(f"{m} ({err})" for m, err in missing.items())
        if in_ci():
            pytest.fail(f"CI=true and the {extra} extra is not installed: cannot import {why}; {EXTRAS[extra]}",
                        pytrace=False)
        pytest.skip(f"needs the {extra} extra: {EXTRAS[extra]} (cannot import {', '.join(missing)})")


def needs_gpu(what: str):
    """Skip unless JAX's default backend is a GPU. Allowed under CI=true: the CI command is CPU only, and
    these tests run on the GPU machine (`python -m pytest tests/...` there)."""
    return _allowed(pytest.mark.skipif(jax.default_backend() != "gpu", reason=f"needs a GPU: {what}"))


def opt_in(variable: str, why: str):
    """Run only when the environment sets `variable`=1; allowed to skip under CI=true, because it is run by
    what sets the variable (named in `why`)."""
    return _allowed(pytest.mark.skipif(os.environ.get(variable) != "1",
                                       reason=f"opt-in: set {variable}=1 to run it; {why}"))


def _allowed(mark: pytest.MarkDecorator):
    def apply(test):
        return pytest.mark.ci_may_skip(mark(test))
    return apply


def may_skip_in_ci(item: pytest.Item) -> bool:
    return item.get_closest_marker("ci_may_skip") is not None
