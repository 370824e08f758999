"""The distillation teacher: found, checked against the student's tokenizer, loaded forward-only in bf16.

A teacher is a workdir of this project (its config.json and newest checkpoint) or a local Hugging Face
Llama folder, imported once through `kslm import`'s path into WORKDIR/teacher_import. Its parameters live
on the student's mesh, sharded by their own logical axes, as bf16 arrays the train step reads and never
updates: no gradients, no optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from kslm_jax.core import checkpoint
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import llama
from kslm_jax.train import hf_import, optim
from kslm_jax.train import state as state_lib

log = logging.getLogger("kslm")

IMPORT_DIR = "teacher_import"


@dataclasses.dataclass(frozen=True)
class Teacher:
    workdir: Path                 # a workdir of this project (the import folder for an HF teacher)
    cfg: object                   # the teacher's own config (storage layout of its checkpoint)
    model_cfg: llama.ModelConfig  # how it runs here: bf16, the student's attention kernel


def resolve(cfg, student_workdir: Path) -> Teacher:
    """The teacher named by cfg.distill, after checking that it shares the student's tokenizer."""
    d = cfg.distill
    src = Path(d.teacher).expanduser()
    if not src.is_dir():
        raise KslmError(f"config key distill.teacher={d.teacher!r}: folder not found; name a workdir of this "
                        "project or (with distill.teacher_format=hf) a local Hugging Face Llama folder")
    if d.teacher_format == "hf":
        wd = _imported(src, Path(student_workdir))
        teacher_tok = src / "tokenizer.model"
    else:
        if not (src / "config.json").is_file():
            raise KslmError(f"teacher {src} has no config.json: it is not a workdir of this project "
                            "(for a Hugging Face folder set distill.teacher_format=hf)")
        wd = src
        teacher_tok = workdir_lib.paths(wd)["tokenizer"]
    check_tokenizer(workdir_lib.paths(student_workdir)["tokenizer"], teacher_tok)
    tcfg = config_lib.read_workdir_config(wd)
    if config_lib.padded_vocab(tcfg) < cfg.tokenizer.vocab_size:
        raise KslmError(f"teacher {src} has {config_lib.padded_vocab(tcfg)} output rows, fewer than the "
                        f"{cfg.tokenizer.vocab_size} tokenizer pieces; it cannot be this student's teacher")
    # The teacher runs where the student runs: its attention kernel and packing limits, bf16, no remat.
    model_cfg = dataclasses.replace(llama.ModelConfig.from_config(tcfg), dtype="bfloat16", param_dtype="bfloat16",
                                    attention=cfg.model.attention, remat="none",
                                    max_segments=cfg.data.max_segments_per_row)
    return Teacher(workdir=wd, cfg=tcfg, model_cfg=model_cfg)


def check_tokenizer(student: Path, teacher: Path) -> None:
    """Same SentencePiece model file, or at least the same pieces under the same ids; else one error."""
    for p in (student, teacher):
        if not p.is_file():
            raise KslmError(f"tokenizer {p} not found; distillation needs the student's and the teacher's")
    if student.read_bytes() == teacher.read_bytes():
        return
    a, b = tok_lib.load(student), tok_lib.load(teacher)
    n = a.GetPieceSize()
    if n != b.GetPieceSize() or any(a.IdToPiece(i) != b.IdToPiece(i) for i in range(n)):
        raise KslmError(f"the student's tokenizer {student} and the teacher's {teacher} differ: distillation "
                        "compares predictions token id by token id, so both must have the same pieces; "
                        "tokenize the student's corpus with the teacher's tokenizer")


def _fingerprint(src: Path) -> dict:
    files = sorted(p for p in src.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".json", ".model")))
    return {"source": str(src.resolve()), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def _imported(src: Path, student_workdir: Path) -> Path:
    """An HF teacher as a workdir inside the student's, imported on first use and again when it changes."""
    target = student_workdir / IMPORT_DIR
    marker = target / "source.json"
    want = _fingerprint(src)
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return target
    if target.exists():
        shutil.rmtree(target)
    log.info("importing the Hugging Face teacher %s into %s", src, target)
    hf_import.import_hf(src, target, force=True)
    workdir_lib.atomic_write_text(marker, json.dumps(want, indent=1) + "\n")
    return target


def load_params(teacher: Teacher, mesh, rules, step: int | None = None):
    """The newest checkpoint's (or `step`'s) parameters as bf16 arrays on `mesh`, their shardings, the step."""
    tcfg = teacher.cfg
    stored = llama.Transformer(llama.ModelConfig.from_config(tcfg))  # the checkpoint's own layout and dtypes
    tx, _ = optim.make(tcfg.optim, tcfg.train.steps)
    abstract, shardings = state_lib.abstract_and_shardings(stored, tx, tcfg.train.seed, mesh, rules)
    with jax.set_mesh(mesh):
        step, state = checkpoint.restore_params(workdir_lib.paths(teacher.workdir)["checkpoints"], abstract, step)
        cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),
                       out_shardings=shardings.params)
        params = cast(state.params)
    del state  # the restored optimizer moments are dropped here, never kept beside the student
    return params, shardings.params, int(step)


def logits(model: llama.Transformer, params, batch, n_vocab: int):
    """Teacher logits over the tokenizer's real pieces (padding rows dropped), never differentiated."""
    out = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return jax.lax.stop_gradient(out[..., :n_vocab])
