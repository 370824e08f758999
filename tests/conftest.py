"""Test setup: 8 fake CPU devices (for the sharding tests) and one small prepared workdir shared by the suite."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import cpu_env

os.environ.setdefault("XLA_FLAGS", cpu_env.flags(8))
# With the tpu extra installed, every process (the suite's and each `python -m kslm_jax` it starts) would
# otherwise probe for a TPU, print libtpu's warnings and race for its lock file. The suite runs on CPU;
# `kslm compile` still reaches libtpu's topologies, which need no TPU backend. A GPU machine keeps its GPU.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

try:
    jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError):  # older jax: the XLA flag above does it
    pass

import extras  # noqa: E402
import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    extras.check(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure, unless the test is declared GPU-only or opt-in (extras.py)."""
    report = (yield).get_result()
    if (extras.in_ci() and report.skipped and not hasattr(report, "wasxfail")
            and not extras.may_skip_in_ci(item)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test may not skip ({reason}); declare why in tests/extras.py if it must"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import fails under CI=true too."""
    report = (yield).get_result()
    if extras.in_ci() and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test module may not skip ({reason})"

@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session, in its tmp: the suite compiles the same small programs again and
    again (each Trainer, each `python -m kslm_jax` subprocess, each xdist worker), and on CPU compiling is most of
    its time. The size cap only turns on jax's file lock, so that workers and subprocesses never read an entry
    another is still writing; but with it on, every write lists and reads the whole cache to find what to evict
    (34 ms a write at 1,000 entries, 103 ms at 3,000, on 2 cores). So programs that compile in under 0.1 s are
    not kept: recompiling them is cheaper than the writes, and the op-by-op ones (jax_debug_nans reruns, eager
    jnp calls) numbered hundreds per test. Subprocesses inherit the settings through the JAX_* variables."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's tmp, above each worker's own
    settings = {"jax_compilation_cache_dir": str(root / "xla-cache"), "jax_persistent_cache_min_compile_time_secs": 0.1,
                "jax_persistent_cache_min_entry_size_bytes": -1, "jax_compilation_cache_max_size": 8 << 30}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    yield


# A small, fast recipe on the bundled corpus; tests shrink it further with overrides.
TINY = [
    "tokenizer.vocab_size=1000",
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "data.seq_len=64", "train.batch_size=8", "train.steps=20", "train.log_every=1",
    "optim.warmup_steps=2", "checkpoint.every_steps=10", "logging.progress_bar=false",
    "mesh.data=1",
]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A workdir holding clean shards, a tokenizer and token shards of the bundled corpus."""
    from kslm_jax.cli import commands
    wd = tmp_path_factory.mktemp("prepared") / "run"
    args = SimpleNamespace(workdir=str(wd), config="tiny_ko", force=False)
    for stage in (commands.prepare, commands.tokenizer, commands.tokenize):
        stage(args, TINY)
    return wd


@pytest.fixture(scope="session")
def trained_tiny(prepared, tmp_path_factory):
    """A copy of `prepared` trained 20 steps (checkpoint at step 20), for tests that compare exported models
    with JAX: its logits are those of a trained model, not of an initialization. Tests must not change it."""
    import numpy as np

    from kslm_jax.core import workdir as workdir_lib
    from kslm_jax.data import tokenizer as tok_lib
    from kslm_jax.objectives import lm
    wd = tmp_path_factory.mktemp("trained_tiny") / "run"
    shutil.copytree(prepared, wd)
    cfg = workdir_lib.config_for(wd, None, ["train.steps=20", "checkpoint.every_steps=20"], force=True)
    trainer = lm.trainer(cfg, wd)
    trainer.fit()
    params = jax.tree.map(np.asarray, trainer.state.params)
    return SimpleNamespace(workdir=wd, cfg=cfg, model=trainer.model, params=params,
                           sp=tok_lib.check_workdir(cfg, wd))


@pytest.fixture(scope="session")
def uninterrupted(prepared, tmp_path_factory):
    """`kslm train` in a process of its own, 16 steps with a checkpoint every 2, never interrupted: the run that
    the signal test (tests/test_train.py) and the kill -9 test (tests/faults/test_kill.py) must reproduce exactly.
    `copy(dest)` gives them the workdir it started from: `prepared` without its clean text, so that a finished
    run writes no end-of-train samples (a second of generating), which they do not read."""
    import subprocess
    import sys

    import numpy as np

    from kslm_jax.core import checkpoint
    from kslm_jax.core import workdir as workdir_lib
    from kslm_jax.objectives import lm

    def copy(dest):
        return copy_without_clean(prepared, dest)

    def start(wd, **env):
        """This run's `kslm train` in `wd`, started as a process of its own on one device."""
        cmd = [sys.executable, "-m", "kslm_jax", "train", "--workdir", str(wd), "--config.train.steps=16",
               "--config.checkpoint.every_steps=2"]
        return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=cpu_env.one_device_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(wd, **env):
        """start(wd, **env) run to its end; its stderr."""
        proc = start(wd, **env)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return err

    def params(wd):
        t = lm.trainer(workdir_lib.config_for(wd, None, []), wd)
        with jax.set_mesh(t.mesh):
            step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
        return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]

    wd = copy(tmp_path_factory.mktemp("uninterrupted") / "run")
    finish(wd)
    step, leaves = params(wd)
    return SimpleNamespace(workdir=wd, copy=copy, start=start, finish=finish, losses=logged_losses(wd), step=step,
                           params=leaves, losses_of=logged_losses, params_of=params)


def copy_without_clean(src, dest):
    """A workdir copied without its clean text: a run that finishes there writes no end-of-train samples (a
    generate compile per process), for tests that do not read them."""
    return shutil.copytree(src, dest, ignore=shutil.ignore_patterns("clean"))


def logged_losses(wd) -> dict:
    """{step: train/loss} from a run's metrics.jsonl (a step logged twice, before and after a resume, keeps its
    last value); a line still being written by a live run is left out."""
    path = Path(wd) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else []
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def committed_steps(wd) -> list[int]:
    """The checkpoint steps committed in a workdir, ascending (none before its first save)."""
    return sorted(int(p.name) for p in (Path(wd) / "checkpoints").glob("*") if p.name.isdigit())


def right_padded(rows):
    """Token-id rows of different lengths as one (rows, longest) int64 batch, padded on the right with id 0."""
    import numpy as np
    ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids


@pytest.fixture
def workdir(prepared, tmp_path):
    """A private copy of the prepared workdir, so tests can train into it."""
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    return wd


def init_params(c, seed: int = 0):
    """A model of config `c` and its unboxed float parameters, initialized under jit."""
    import jax.numpy as jnp

    from kslm_jax.model import llama
    model = llama.Transformer(c)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                               is_leaf=lambda x: hasattr(x, "unbox"))


def random_params(c, seed: int = 0, std: float = 0.1):
    """A model of config `c` and float32 numpy parameters of its shapes without compiling model.init (seconds
    per shape on 2 cores): matrices N(0, std), norm scales 1 + N(0, std). A large std gives peaked attention
    and logits, so a runtime comparison cannot pass on near-uniform output."""
    import jax.numpy as jnp
    import numpy as np

    from kslm_jax.model import llama
    model = llama.Transformer(c)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    shapes = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(seed)
    def draw(path, s):
        return (rng.normal(0.0, std, s.shape) + (path[-1].key == "scale")).astype(np.float32)
    return model, jax.tree_util.tree_map_with_path(draw, shapes)
