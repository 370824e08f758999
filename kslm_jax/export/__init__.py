"""Writers for other runtimes: Hugging Face (hf_io), llama.cpp (gguf_io) and ONNX (onnx_io). Above objectives,
because exporting a fine-tuned run merges its LoRA adapters; HF import is train/hf_import.py.

Every export carries our marker: a `.kslm_export.json` file in an hf or onnx folder, a `kslm_jax.export`
key in a GGUF file's metadata. `--out` may replace only something that carries it.
"""
from __future__ import annotations

import json
from pathlib import Path

from kslm_jax.core.errors import KslmError

MARKER = ".kslm_export.json"
GGUF_KEY = "kslm_jax.export"


def write_marker(folder: Path, fmt: str) -> None:
    """Mark a folder being exported (call inside its temporary folder, before the rename)."""
    (folder / MARKER).write_text(json.dumps({"format": fmt, "by": "kslm_jax"}) + "\n")


def check_out(out: Path, fmt: str) -> None:
    """An export replaces only an earlier export of ours of the same format, never a user's folder or file:
    an --out typed by mistake (a home folder, a dataset, someone else's model) must not be deleted to make
    room. Files that merely look like an export (config.json and tokenizer.model, a GGUF header) are not
    enough: only our marker is."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        ok = False
    elif fmt == "gguf":
        ok = out.is_file() and _gguf_marked(out)
    else:
        ok = out.is_dir() and _folder_format(out) == fmt
    if not ok:
        marker = GGUF_KEY if fmt == "gguf" else MARKER
        raise KslmError(f"--out {out} exists and is not an earlier {fmt} export of kslm (no {marker} marker), so "
                        "it is not replaced; choose a new --out or remove it first")


def _folder_format(out: Path) -> str | None:
    try:
        d = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return d.get("format") if isinstance(d, dict) and d.get("by") == "kslm_jax" else None


def _gguf_marked(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return False
    try:
        import gguf
        return GGUF_KEY in gguf.GGUFReader(str(path)).fields
    except ImportError:
        raise KslmError("checking an earlier GGUF export needs the gguf package: pip install 'kslm_jax[export]'") from None
    except Exception:  # noqa: BLE001 - a truncated or foreign file: not ours to replace
        return False
