"""Security checks: no code execution from data, untrusted weight files fail with one KslmError, TensorBoard
is shown bound to localhost.

The source scans read kslm_jax/ as it is on disk, so a new `pickle.load` or `np.load(...)` without
`allow_pickle=False` anywhere in the package fails here.
"""
from __future__ import annotations

import ast
import io
import json
import os
import re
import resource
import shutil
import stat
import struct
import threading
import tokenize
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
from conftest import random_params
from extras import needs

from kslm_jax.cli import commands
from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import check_out, gguf_io
from kslm_jax.model import llama
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
    d = tmp_path_factory.mktemp("hf_template")
    tcfg = config_lib.base_config().tokenizer
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


def _far_offsets(h):
    h["model.norm.weight"]["data_offsets"] = [0, 10**15]


def _big_shape(h):
    h["model.norm.weight"]["shape"] = [2**40, 2**20]


def _bad_dtype(h):
    h["model.norm.weight"]["dtype"] = "Q99"


# Each damage made from a valid file (`good`, its header `n` bytes long); built in the test, so that a bare
# install without safetensors still collects this file.
CORRUPTIONS = {
    "empty": lambda good, n: b"",
    "seven_bytes": lambda good, n: good[:7],
    "header_cut": lambda good, n: good[:8 + n // 2],
    "data_cut": lambda good, n: good[:8 + n + 100],
    "one_byte_short": lambda good, n: good[:-1],
    "header_len_2^63": lambda good, n: struct.pack("<Q", 2**63) + good[8:],
    "header_len_2^40": lambda good, n: struct.pack("<Q", 2**40) + good[8:],
    "header_len_1e9": lambda good, n: struct.pack("<Q", 10**9) + good[8:],
    "header_len_past_end": lambda good, n: struct.pack("<Q", len(good)) + good[8:],
    "header_not_json": lambda good, n: struct.pack("<Q", 16) + b"{not json at all" + good[8 + 16:],
    "header_is_list": lambda good, n: struct.pack("<Q", 2) + b"[]",
    "offsets_past_end": lambda good, n: _with_header(good, _far_offsets),
    "shape_huge": lambda good, n: _with_header(good, _big_shape),
    "dtype_unknown": lambda good, n: _with_header(good, _bad_dtype),
    "garbage": lambda good, n: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text_file": lambda good, n: "이것은 safetensors가 아니다\n".encode() * 50,
}
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


@needs("export", "safetensors")
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_import_hf_corrupt_safetensors(hf_template, tmp_path, case):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_template, hf_dir)
    good = _valid_safetensors()
    (hf_dir / "model.safetensors").write_bytes(CORRUPTIONS[case](good, _header_len(good)))
    msg = _import_expecting_error(hf_dir, tmp_path / "wd")
    assert "cannot read the safetensors weights" in msg and str(hf_dir) in msg


@needs("export", "safetensors")
@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_import_hf_corrupt_index(hf_template, tmp_path, case):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_template, hf_dir)
    (hf_dir / "x.safetensors").write_bytes(_valid_safetensors())
    (hf_dir / "model.safetensors.index.json").write_text(BAD_INDEXES[case])
    msg = _import_expecting_error(hf_dir, tmp_path / "wd")
    assert "cannot read the safetensors weights" in msg


@needs("export", "safetensors")
def test_import_hf_corrupt_shard_of_many(hf_template, tmp_path):
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
# GGUF: kslm writes GGUF and reads only the magic of an existing --out (export/__init__.py check_out), to tell an
# earlier export it may replace from a user's file it must keep. Hostile --out paths, arguments and vocabularies.

def _gguf_run():
    """The tiny recipe's config at 300 pieces and random weights of its model (no compilation)."""
    cfg = config_lib.load("tiny_ko", ["tokenizer.vocab_size=300", "model.d_model=64", "model.n_layers=2",
                                      "model.n_heads=4", "model.n_kv_heads=2"])
    return cfg, random_params(llama.ModelConfig.from_config(cfg))[1]


def _refused_out(tmp_path: Path, case: str) -> tuple[Path, callable]:
    """An --out path that is not an earlier GGUF export, and a function returning what must stay unchanged."""
    out = tmp_path / "model.gguf"
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"GGUF" + bytes(range(60)))  # someone's real-looking model the link points to
    if case == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("내 메모", encoding="utf-8")
        return out, lambda: sorted((p.name, p.read_bytes()) for p in out.iterdir())
    if case == "symlink_to_gguf":
        out.symlink_to(victim)
        return out, lambda: (os.readlink(out), victim.read_bytes())
    if case == "dangling_symlink":
        out.symlink_to(tmp_path / "nowhere" / "x.gguf")
        return out, lambda: (os.readlink(out), (tmp_path / "nowhere").exists())
    if case == "fifo":  # reading its magic would block for ever
        os.mkfifo(out)
        return out, lambda: stat.S_ISFIFO(out.lstat().st_mode)
    out.write_bytes({"empty": b"", "magic_cut": b"GGU", "lowercase_magic": b"gguf" + bytes(60),
                     "text": "모델이 아니다\n".encode() * 10, "magic_at_offset_1": b" GGUF" + bytes(60)}[case])
    return out, out.read_bytes


REFUSED_OUTS = ["empty", "magic_cut", "lowercase_magic", "text", "magic_at_offset_1", "directory",
                "symlink_to_gguf", "dangling_symlink", "fifo"]


@pytest.mark.parametrize("case", REFUSED_OUTS)
def test_export_gguf_refuses_an_out_that_is_not_an_earlier_export(tmp_path, case):
    """`kslm export --format gguf --out X` where X is not a GGUF file kslm may replace: one KslmError, X and
    anything it links to unchanged, and no read that could block (a FIFO) or follow a link."""
    out, state = _refused_out(tmp_path, case)
    before = state()
    outcome = []

    def run():
        args = SimpleNamespace(workdir=str(tmp_path / "no-run"), format="gguf", quant=None, out=str(out))
        try:
            commands.export(args, [])
        except BaseException as e:  # noqa: BLE001 - handed to the test thread below
            outcome.append(e)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"export blocked on --out {case}"
    assert len(outcome) == 1 and isinstance(outcome[0], KslmError), outcome
    msg = str(outcome[0])
    assert "is not an earlier gguf export" in msg and str(out) in msg and "\n" not in msg, msg
    assert state() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", "victim.gguf"])


@needs("export", "gguf")
def test_gguf_never_writes_through_a_link_and_replaces_a_cut_export(hf_template, tmp_path):
    """The writer renames a finished file over --out: a symlink there is replaced, never written through.
    A GGUF cut short (our writer renames only finished files, so not ours) is refused, not replaced."""
    import gguf
    cfg, params = _gguf_run()
    sp = tok_lib.load(hf_template / "tokenizer.model")
    clean = gguf_io.write_gguf(params, cfg, sp, tmp_path / "clean" / "m.gguf").read_bytes()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"GGUF someone else's bytes")
    link = tmp_path / "out" / "m.gguf"
    link.parent.mkdir()
    link.symlink_to(victim)
    gguf_io.write_gguf(params, cfg, sp, link)
    assert not link.is_symlink() and link.read_bytes() == clean
    assert victim.read_bytes() == b"GGUF someone else's bytes"

    cut = tmp_path / "cut" / "m.gguf"
    cut.parent.mkdir()
    cut.write_bytes(clean[: len(clean) // 3])
    with pytest.raises(Exception):  # noqa: B017 - the cut file is unreadable, whatever the reader raises
        gguf.GGUFReader(str(cut))
    # It starts with the magic, but its marker cannot be read back: not provably ours, so it stays.
    with pytest.raises(KslmError, match="not an earlier gguf export"):
        check_out(cut, "gguf")
    assert cut.read_bytes() == clean[: len(clean) // 3]


@needs("export", "gguf")
@pytest.mark.parametrize("quant", ["q4_0; rm -rf ~", "Q4_0", "../q8_0", "", "f32", "q4_0\n"])
def test_gguf_hostile_quant_writes_nothing(hf_template, tmp_path, quant):
    cfg, params = _gguf_run()
    (tmp_path / "out").mkdir()
    with pytest.raises(KslmError) as info:
        gguf_io.write_gguf(params, cfg, tok_lib.load(hf_template / "tokenizer.model"), tmp_path / "out" / "m.gguf",
                           quant)
    assert "is not one of f16, q8_0, q4_0" in str(info.value)
    assert not list((tmp_path / "out").iterdir())


# Pieces a tokenizer from elsewhere (kslm import of a Hugging Face model) may hold: direction overrides, joiners,
# format strings, escapes, a template marker, a long piece and a multi-codepoint emoji.
ODD_PIECES = ["\u202e뒤집힘", "a\u200db", "%s%n%x", "{0}{__class__}", "\\x00", "<|end|>", "가" * 40,
              "\U0001f469\u200d\U0001f469\u200d\U0001f467", "${HOME}"]


@needs("export", "gguf")
def test_gguf_vocabulary_is_written_byte_exact(tmp_path):
    """Every piece goes into tokenizer.ggml.tokens as its exact UTF-8 bytes (read back with the gguf package
    as an oracle), odd pieces included, and the rows that pad the logits are unused tokens."""
    import gguf
    model = io.BytesIO()
    texts = ["대한민국은 민주공화국이다.", "모든 권력은 국민으로부터 나온다.", "이 법은 공포한 날부터 시행한다."] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
                                   vocab_size=360, byte_fallback=True, user_defined_symbols=ODD_PIECES,
                                   pad_id=tok_lib.PAD, unk_id=tok_lib.UNK, bos_id=tok_lib.BOS, eos_id=tok_lib.EOS,
                                   normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert all(sp.PieceToId(p) != sp.unk_id() for p in ODD_PIECES)
    cfg, params = _gguf_run()
    rows, n = llama.ModelConfig.from_config(cfg).vocab_size, sp.GetPieceSize()  # logits rows > 360 pieces
    path = gguf_io.write_gguf(params, cfg, sp, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(path)).fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]) for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens[:n] == [sp.IdToPiece(i).encode("utf-8") for i in range(n)]
    assert len(tokens) == rows and tokens[n:] == [f"[PAD{i}]".encode() for i in range(n, rows)]
    types = fields["tokenizer.ggml.token_type"]
    assert {int(types.parts[i][0]) for i in types.data[n:]} == {int(gguf.TokenType.UNUSED)}


# ---------------------------------------------------------------------------------------------------------
# TensorBoard: every command shown binds to localhost

_TB_COMMAND = re.compile(r"(?<![\w/.-])tensorboard[ \t]+--[^\n`]*")


@pytest.mark.parametrize("doc", ["README.md", "launch/README.md", "benchmarks/README.md", "kslm_jax/cli/commands.py"])
def test_tensorboard_commands_bind_localhost(doc):
    path = REPO / doc
    assert path.is_file(), f"{doc} is gone; update this test's list of documents"
    text = path.read_text(encoding="utf-8")
    commands = _TB_COMMAND.findall(text)
    if doc in ("README.md", "launch/README.md"):
        assert commands, f"{doc} shows no tensorboard command any more; update this test"
    for cmd in commands:
        assert re.search(r"--host[ =](?:127\.0\.0\.1|localhost)\b", cmd), f"{doc}: {cmd!r} does not bind to localhost"
    assert "--bind_all" not in text and not re.search(r"--host[ =]0\.0\.0\.0", text)
