"""Security checks: no code execution from data, untrusted weight files fail with one KslmError, TensorBoard
is shown bound to localhost.

The source scans read kslm_jax/ as it is on disk, so a new `pickle.load` or `np.load(...)` without
`allow_pickle=False` anywhere in the package fails here.
"""
from __future__ import annotations

import ast
import io
import json
import re
import resource
import shutil
import struct
import tokenize
from pathlib import Path

import numpy as np
import pytest

from kslm_jax.core.errors import KslmError
from kslm_jax.train import hf_import

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "kslm_jax"


def package_sources() -> list[Path]:
    files = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 10, f"found only {len(files)} sources under {PKG}"
    return files


# ---------------------------------------------------------------------------------------------------------
# source scans

_STRINGS = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, n) for n in ("FSTRING_MIDDLE",) if hasattr(tokenize, n)}


def code_only(source: str) -> str:
    """The source with comments and string literals blanked to spaces; lines and columns unchanged."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _STRINGS:
            continue
        (sr, sc), (er, ec) = tok.start, tok.end
        for r in range(sr, er + 1):
            row = lines[r - 1]
            lo = sc if r == sr else 0
            hi = ec if r == er else len(row)
            for i in range(lo, hi):
                if row[i] != "\n":
                    row[i] = " "
    return "".join("".join(row) for row in lines)


# Text patterns over code (comments and strings blanked). `\bexec\(` does not match `spec.loader.exec_module(`:
# the recipe loader runs a config file the user chose, like a training script, and is allowed.
TEXT_RULES = {
    "import pickle": re.compile(r"^\s*(?:import|from)\s+(?:c?[Pp]ickle|_pickle|dill|cloudpickle|shelve|joblib)\b", re.M),
    "pickle.load": re.compile(r"\b(?:c?pickle|dill|cloudpickle|joblib)\.(?:loads?|Unpickler)\b"),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=(?!\s*False\b)"),
    "trust_remote_code=True": re.compile(r"\btrust_remote_code\s*=(?!\s*False\b)"),
    "eval(": re.compile(r"(?<![\w.])(?<!def )eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])(?<!def )exec\s*\("),
}
_NUMPY = {"np", "numpy", "jnp", "onp"}
_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib", "marshal"}


def ast_violations(source: str, name: str = "<src>") -> list[str]:
    """Calls that run code or unpickle data, found in the syntax tree (immune to strings and comments)."""
    out = []
    tree = ast.parse(source, name)
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _BANNED_MODULES:
            out.append(f"{where}: from {node.module} import")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
            out.append(f"{where}: {f.id}(...)")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            mod, attr = f.value.id, f.attr
            if mod in ("builtins", "__builtins__") and attr in ("eval", "exec", "compile", "__import__"):
                out.append(f"{where}: {mod}.{attr}(...)")
            if mod in _BANNED_MODULES:
                out.append(f"{where}: {mod}.{attr}(...)")
            if mod in _NUMPY and attr == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    out.append(f"{where}: {mod}.load(...) without allow_pickle=False")
            if mod == "torch" and attr == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    out.append(f"{where}: torch.load(...) without weights_only=True")
            if mod == "yaml" and attr in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                out.append(f"{where}: yaml.{attr}(...) (use yaml.safe_load)")
        if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                              and kw["trust_remote_code"].value is False):
            out.append(f"{where}: trust_remote_code not False")
        if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            out.append(f"{where}: allow_pickle not False")
    return out


def text_violations(source: str, name: str = "<src>") -> list[str]:
    code = code_only(source)
    out = []
    for rule, pattern in TEXT_RULES.items():
        for m in pattern.finditer(code):
            lineno = code.count("\n", 0, m.start()) + 1
            out.append(f"{name}:{lineno}: {rule}: {source.splitlines()[lineno - 1].strip()}")
    return out


BAD_SNIPPETS = [
    "import pickle\n", "import os, pickle\n", "from pickle import loads\n", "import cloudpickle as cp\n",
    "x = pickle.load(f)\n", "x = eval('1+1')\n", "exec(code)\n", "y = eval (s)\n", "builtins.eval(s)\n",
    "np.load(f)\n", "np.load(f, allow_pickle=True)\n", "numpy.load(f, allow_pickle=flag)\n",
    "m = AutoModel.from_pretrained(p, trust_remote_code=True)\n", "torch.load(p)\n", "yaml.load(s)\n",
    "f = __import__('os')\n", "c = compile(s, 'f', 'exec')\n",
]
GOOD_SNIPPETS = [
    "def eval(args, overrides):\n    return 0\n", "spec.loader.exec_module(module)\n", "v = ast.literal_eval(raw)\n",
    "# never eval( or exec( or import pickle here\n", "s = 'eval(x) pickle.load(f) trust_remote_code=True'\n",
    "d = '''\nimport pickle\nexec(x)\n'''\n", "np.load(f, allow_pickle=False)\n", "r = commands.eval(args, [])\n",
    "model.eval()\n", "j = jax.jit(f).lower(x).compile()\n", "p = re.compile('x')\n", "self._print_eval(step)\n",
    "tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False)\n",
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_scanner_flags(snippet):
    assert ast_violations(snippet), snippet


@pytest.mark.parametrize("snippet", ["import pickle\n", "from pickle import loads\n", "x = pickle.load(f)\n",
                                     "x = eval('1+1')\n", "exec(code)\n", "y = eval (s)\n", "np.load(f, allow_pickle=True)\n",
                                     "m = from_pretrained(p, trust_remote_code = True)\n", "np.load(f, allow_pickle = 1)\n"])
def test_text_rules_flag(snippet):
    assert text_violations(snippet), snippet


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_scanner_passes(snippet):
    assert not ast_violations(snippet) and not text_violations(snippet), snippet


def test_no_code_execution_or_unpickling_in_package():
    problems = []
    for path in package_sources():
        source = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(REPO))
        problems += ast_violations(source, rel) + text_violations(source, rel)
    assert not problems, "\n".join(problems)


def test_every_np_load_refuses_pickles():
    calls = []
    for path in package_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in _NUMPY):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "no np.load call found: the scan is broken (data/shards.py reads .lengths.npy)"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def test_recipe_loader_is_the_only_exec_module():
    """Running Python is reserved for the recipe the user names with --config; nothing else imports files."""
    hits = [f"{p.relative_to(REPO)}:{i}" for p in package_sources()
            for i, line in enumerate(code_only(p.read_text(encoding="utf-8")).splitlines(), 1)
            if re.search(r"\bexec_module\s*\(|\bspec_from_file_location\s*\(|\brunpy\b|\bimport_module\s*\(", line)]
    assert hits and all(h.startswith("kslm_jax/core/config.py:") for h in hits), hits


# ---------------------------------------------------------------------------------------------------------
# corrupted safetensors → one KslmError


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory):
    """A minimal HF Llama directory without weights: config.json for a tiny model and a 300-piece tokenizer."""
    from kslm_jax.core import config
    from kslm_jax.data import tokenizer as tok_lib
    d = tmp_path_factory.mktemp("hf_template")
    tcfg = config.base_config().tokenizer
    with tcfg.unlocked():
        tcfg.vocab_size, tcfg.sample_sentences = 300, 1000
    texts = ["대한민국은 민주공화국이다.", "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
             "이 법은 공포한 날부터 시행한다."] * 20
    sp = tok_lib.train(texts, d / "spm" / "spm.model", tcfg)
    shutil.copy(d / "spm" / "spm.model", d / "tokenizer.model")
    shutil.rmtree(d / "spm")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": sp.GetPieceSize(),
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True}))
    return d


def _valid_safetensors() -> bytes:
    from safetensors.numpy import save
    rng = np.random.default_rng(0)
    return save({"model.embed_tokens.weight": rng.standard_normal((300, 16), np.float32),
                 "model.norm.weight": np.ones(16, np.float32)}, metadata={"format": "pt"})


def _header_len(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


def _with_header(blob: bytes, edit) -> bytes:
    n = _header_len(blob)
    header = json.loads(blob[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + blob[8 + n:]


def _corruptions() -> dict:
    good = _valid_safetensors()
    n = _header_len(good)

    def far_offsets(h):
        h["model.norm.weight"]["data_offsets"] = [0, 10**15]

    def big_shape(h):
        h["model.norm.weight"]["shape"] = [2**40, 2**20]

    def bad_dtype(h):
        h["model.norm.weight"]["dtype"] = "Q99"

    rng = np.random.default_rng(1)
    return {
        "empty": b"",
        "seven_bytes": good[:7],
        "header_cut": good[:8 + n // 2],
        "data_cut": good[:8 + n + 100],
        "one_byte_short": good[:-1],
        "header_len_2^63": struct.pack("<Q", 2**63) + good[8:],
        "header_len_2^40": struct.pack("<Q", 2**40) + good[8:],
        "header_len_1e9": struct.pack("<Q", 10**9) + good[8:],
        "header_len_past_end": struct.pack("<Q", len(good)) + good[8:],
        "header_not_json": struct.pack("<Q", 16) + b"{not json at all" + good[8 + 16:],
        "header_is_list": struct.pack("<Q", 2) + b"[]",
        "offsets_past_end": _with_header(good, far_offsets),
        "shape_huge": _with_header(good, big_shape),
        "dtype_unknown": _with_header(good, bad_dtype),
        "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text_file": "이것은 safetensors가 아니다\n".encode() * 50,
    }


CORRUPTIONS = _corruptions()
BAD_INDEXES = {
    "index_not_json": "{weight_map",
    "index_list": "[]",
    "index_no_weight_map": "{}",
    "weight_map_list": '{"weight_map": []}',
    "weight_map_unhashable": '{"weight_map": {"a": ["x"]}}',
    "weight_map_int": '{"weight_map": {"a": 5}}',
    "weight_map_mixed": '{"weight_map": {"a": "x.safetensors", "b": 3}}',
    "shard_missing": '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}',
}


def _import_expecting_error(hf_dir: Path, workdir: Path) -> str:
    from kslm_jax.core import sharding  # noqa: F401 - imported here so that imports do not count as growth
    from kslm_jax.train import optim, state  # noqa: F401
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(KslmError) as info:
        hf_import.import_hf(hf_dir, workdir)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is KiB on Linux
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB reading a corrupt file"
    assert not workdir.exists(), "a failed import left a workdir behind"
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_import_hf_corrupt_safetensors(hf_template, tmp_path, case):
    pytest.importorskip("safetensors")
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_template, hf_dir)
    (hf_dir / "model.safetensors").write_bytes(CORRUPTIONS[case])
    msg = _import_expecting_error(hf_dir, tmp_path / "wd")
    assert "cannot read the safetensors weights" in msg and str(hf_dir) in msg


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_import_hf_corrupt_index(hf_template, tmp_path, case):
    pytest.importorskip("safetensors")
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_template, hf_dir)
    (hf_dir / "x.safetensors").write_bytes(_valid_safetensors())
    (hf_dir / "model.safetensors.index.json").write_text(BAD_INDEXES[case])
    msg = _import_expecting_error(hf_dir, tmp_path / "wd")
    assert "cannot read the safetensors weights" in msg


def test_import_hf_corrupt_shard_of_many(hf_template, tmp_path):
    pytest.importorskip("safetensors")
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_template, hf_dir)
    good = _valid_safetensors()
    (hf_dir / "model-00001-of-00002.safetensors").write_bytes(good)
    (hf_dir / "model-00002-of-00002.safetensors").write_bytes(good[: len(good) // 2])
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    assert "cannot read the safetensors weights" in _import_expecting_error(hf_dir, tmp_path / "wd")


# ---------------------------------------------------------------------------------------------------------
# truncated GGUF: gguf.GGUFReader (not ours) raises; kslm only writes GGUF


def test_gguf_reader_rejects_every_truncation(tmp_path):
    """Measured with gguf 0.x: every proper prefix raises ValueError (mostly) or IndexError inside
    GGUFReader; none returns a reader. We only write GGUF, so this documents the reader users load ours with."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "작은 모델")
    w.add_token_list([b"a", "가".encode(), b"<0x00>"])
    w.add_tensor("t1", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("t2", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    good = path.read_bytes()
    reader = gguf.GGUFReader(str(path))  # the intact file reads back
    t1 = next(t for t in reader.tensors if t.name == "t1")
    np.testing.assert_array_equal(np.asarray(t1.data).reshape(-1), np.arange(64, dtype=np.float32))
    del reader, t1
    returned = []
    for n in range(len(good)):
        cut = tmp_path / f"cut{n}.gguf"  # a new file each time: never truncate a file a reader has mapped
        cut.write_bytes(good[:n])
        try:
            gguf.GGUFReader(str(cut))
        except Exception:  # noqa: BLE001 - any exception is the documented outcome
            continue
        finally:
            cut.unlink()
        returned.append(n)
    assert not returned, f"GGUFReader returned a reader for truncations at {returned[:10]}"
    for i, blob in enumerate((b"XXXX" + good[4:], good[:4] + struct.pack("<I", 99) + good[8:],
                              good[:8] + struct.pack("<Q", 2**62) + good[16:],
                              good[:16] + struct.pack("<Q", 2**62) + good[24:])):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(Exception):  # noqa: B017 - bad magic/version, absurd tensor or key counts
            gguf.GGUFReader(str(bad))


# ---------------------------------------------------------------------------------------------------------
# TensorBoard: every command shown binds to localhost

_TB_COMMAND = re.compile(r"(?<![\w/.-])tensorboard[ \t]+--[^\n`]*")


@pytest.mark.parametrize("doc", ["README.md", "launch/README.md", "benchmarks/README.md", "kslm_jax/cli/commands.py"])
def test_tensorboard_commands_bind_localhost(doc):
    path = REPO / doc
    if not path.is_file():
        pytest.skip(f"{doc} not present")
    text = path.read_text(encoding="utf-8")
    commands = _TB_COMMAND.findall(text)
    if doc in ("README.md", "launch/README.md"):
        assert commands, f"{doc} shows no tensorboard command any more; update this test"
    for cmd in commands:
        assert re.search(r"--host[ =](?:127\.0\.0\.1|localhost)\b", cmd), f"{doc}: {cmd!r} does not bind to localhost"
    assert "--bind_all" not in text and not re.search(r"--host[ =]0\.0\.0\.0", text)
