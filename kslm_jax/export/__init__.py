"""Writers for other runtimes: Hugging Face (hf_io), llama.cpp (gguf_io) and ONNX (onnx_io). Above objectives,
because exporting a fine-tuned run merges its LoRA adapters; HF import is train/hf_import.py."""
from __future__ import annotations

from pathlib import Path

from kslm_jax.core.errors import KslmError

# What an earlier export of each folder format holds; --out may replace only such a folder.
_FOLDER_MARKERS = {"hf": ("config.json", "tokenizer.model"), "onnx": ("model.onnx", "tokenizer.model")}


def check_out(out: Path, fmt: str) -> None:
    """An export replaces only an earlier export of the same format, never a user's folder or file: an
    --out typed by mistake (a home folder, a dataset) must not be deleted to make room."""
    if not out.exists() and not out.is_symlink():
        return
    if fmt == "gguf":
        ok = out.is_file() and not out.is_symlink() and _magic(out) == b"GGUF"
    else:
        ok = out.is_dir() and not out.is_symlink() and all((out / m).is_file() for m in _FOLDER_MARKERS[fmt])
    if not ok:
        raise KslmError(f"--out {out} exists and is not an earlier {fmt} export, so it is not replaced; "
                        "choose a new --out or remove it first")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)
