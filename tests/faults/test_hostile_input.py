"""Issue 17 items 1, 5, 6 and 10: export replaces only its own marked output; HF import refuses wrong,
non-finite or hostile input in one line and writes nothing; damaged manifests and full disks are one line.
Cases that stop in our own code run `kslm` in the test process (tests/cli_inproc.py); those where a library's
threads or C++ code could print after our line (a damaged shard, training, a full disk) run a subprocess."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_without_clean
from cli_inproc import kslm
from extras import needs
from one_line import one_line_error

import cpu_env

from kslm_jax.core.errors import KslmError

HF = needs("export", "safetensors")
GGUF = needs("export", "gguf")

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--config.logging.progress_bar=false"]


def kslm_process(*args):
    env = cpu_env.one_device_env(JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kslm_jax", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hf_dir(trained_tiny, tmp_path_factory):
    from kslm_jax.export import hf_io
    return hf_io.export_hf(trained_tiny.workdir, tmp_path_factory.mktemp("hf") / "hf")


# ------------------------------------------------------------------ item 1: export marker

@HF
def test_export_keeps_a_folder_that_only_looks_like_an_export(trained_tiny, tmp_path):
    x = tmp_path / "X"
    (x / "original").mkdir(parents=True)
    (x / "config.json").write_text("{}")
    shutil.copy(trained_tiny.workdir / "tokenizer" / "spm.model", x / "tokenizer.model")
    (x / "original" / "consolidated.pth").write_text("x")
    one_line_error(kslm("export", "--workdir", trained_tiny.workdir, "--format", "hf", "--out", x), "not replaced")
    assert (x / "original" / "consolidated.pth").read_text() == "x"
    proc = kslm("export", "--workdir", trained_tiny.workdir, "--format", "hf", "--out", tmp_path / "ours")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = kslm("export", "--workdir", trained_tiny.workdir, "--format", "hf", "--out", tmp_path / "ours")
    assert proc.returncode == 0, proc.stderr[-2000:]  # our own earlier export may be replaced


@GGUF
def test_export_keeps_a_foreign_gguf_file(trained_tiny, tmp_path):
    import gguf
    theirs = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(theirs), "llama")
    w.add_name("someone else's model")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    before = theirs.read_bytes()
    one_line_error(kslm("export", "--workdir", trained_tiny.workdir, "--format", "gguf", "--out", theirs),
                   "not replaced")
    assert theirs.read_bytes() == before


# ------------------------------------------------------------------ items 5 and 6: HF import

def _variant(hf_dir, tmp_path, config=None, tensors=None) -> Path:
    from safetensors.numpy import load_file, save_file
    out = tmp_path / "variant"
    shutil.copytree(hf_dir, out)
    if config is not None:
        (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        t = load_file(str(out / "model.safetensors"))
        tensors(t)
        save_file(t, str(out / "model.safetensors"))
    return out


def _set(key, value):
    def edit(hf_dir):
        c = json.loads((hf_dir / "config.json").read_text())
        if value is _set:
            del c[key]
        else:
            c[key] = value
        return c
    return edit


K = "model.layers.0.self_attn.k_proj.weight"
CONFIGS = {
    "hidden_1e9": _set("hidden_size", 10**9), "layers_1e9": _set("num_hidden_layers", 10**9),
    "vocab_1e12": _set("vocab_size", 10**12), "no_heads": _set("num_attention_heads", _set),
    "heads_0": _set("num_attention_heads", 0), "size_string": _set("hidden_size", "128"),
    "size_float": _set("hidden_size", 128.5), "rope_abc": _set("rope_theta", "abc"),
    "list": lambda d: [1, 2, 3], "deep": lambda d: "[" * 100_000 + "]" * 100_000,
}
TENSORS = {
    "k_transposed": lambda t: t.update({K: np.ascontiguousarray(t[K].T)}),
    "int8": lambda t: t.update({K: t[K].astype(np.int8)}),
    "nan": lambda t: t[K].__setitem__((0, 0), np.nan),
    "missing": lambda t: t.pop(K),
}


def _refused(src, wd) -> str:
    from kslm_jax.train import hf_import
    with pytest.raises(KslmError) as info:
        hf_import.import_hf(src, wd)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert not wd.exists(), "a failed import wrote into the workdir"
    return msg


@HF
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_config_is_one_line(hf_dir, tmp_path, case):
    c = CONFIGS[case](hf_dir)
    _refused(_variant(hf_dir, tmp_path, config=c if isinstance(c, str) else json.dumps(c)), tmp_path / "wd")


@HF
@pytest.mark.parametrize("case", sorted(TENSORS))
def test_wrong_tensor_is_refused_by_name(hf_dir, tmp_path, case):
    msg = _refused(_variant(hf_dir, tmp_path, tensors=TENSORS[case]), tmp_path / "wd")
    assert K in msg, msg


@HF
def test_failed_import_leaves_nothing_so_a_retry_needs_no_force(hf_dir, tmp_path):
    bad = _variant(hf_dir, tmp_path, tensors=TENSORS["nan"])
    wd = tmp_path / "wd"
    one_line_error(kslm("import", "--hf", bad, "--workdir", wd), K)
    assert not wd.exists()
    proc = kslm("import", "--hf", hf_dir, "--workdir", wd)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ item 10: one line, not tracebacks

def test_garbage_token_manifest_is_one_line(prepared, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    (wd / "data" / "tokens" / "manifest.json").write_text('{"train": [1, 2')
    one_line_error(kslm("train", "--workdir", wd, *QUIET), "manifest.json", "kslm tokenize")


def test_flipped_shard_without_verification_is_one_line(prepared, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(prepared, wd)
    shard = sorted((wd / "data" / "tokens").glob("train-*.arrayrecord"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(kslm_process("train", "--workdir", wd, "--config.data.verify_shards=false", *QUIET), "damaged")


def test_zeroed_unsealed_step_falls_back_without_tracebacks(trained_tiny, tmp_path):
    wd = tmp_path / "run"
    copy_without_clean(trained_tiny.workdir, wd)  # no end-of-train samples, which this test does not read
    # Writing step 22 needs no process of its own; reading it back does (orbax's and tensorstore's threads).
    proc = kslm("train", "--workdir", wd, "--config.train.steps=22", "--config.checkpoint.every_steps=2", *QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    step = wd / "checkpoints" / "22"
    (step / "kslm_checksums.json").unlink()
    for f in step.rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(b"\0" * f.stat().st_size)
    proc = kslm_process("train", "--workdir", wd, "--config.train.steps=24", "--config.checkpoint.every_steps=2",
                        *QUIET)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint step 22 is damaged" in proc.stderr and "restored checkpoint step 20" in proc.stderr


@pytest.fixture
def full_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-capped tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> None:
    (mnt / "filler").write_bytes(b"\0" * max(shutil.disk_usage(mnt).free - leave, 0))


@pytest.mark.parametrize("fmt", [pytest.param("hf", marks=HF), pytest.param("gguf", marks=GGUF)])
def test_export_to_a_full_disk_is_one_line(trained_tiny, full_disk, fmt):
    out = full_disk / ("m.gguf" if fmt == "gguf" else "hf")
    _fill(full_disk, 200 * 1024)  # room for the metadata, not for the weights
    one_line_error(kslm_process("export", "--workdir", trained_tiny.workdir, "--format", fmt, "--out", out),
                   "disk full")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial output left


def test_tokenize_on_a_full_disk_is_one_line(prepared, full_disk):
    wd = full_disk / "run"
    shutil.copytree(prepared, wd, ignore=shutil.ignore_patterns("tokens", "checkpoints"))
    _fill(full_disk, 64 * 1024)
    one_line_error(kslm_process("tokenize", "--workdir", wd), "disk full")
