"""`kslm export`: a workdir's newest checkpoint → Hugging Face, GGUF or ONNX files, replacing only an earlier
export of ours (export/__init__.py's marker), and never leaving an empty export/ folder behind."""
from __future__ import annotations

from pathlib import Path

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import check_out, gguf_io, hf_io, onnx_io


def run(args, overrides) -> int:
    export_dir = Path(args.workdir) / "export"
    fresh = not export_dir.exists()
    try:
        return _export(args, overrides, export_dir)
    finally:  # a failed export leaves no empty export/ behind (a folder that held something before stays)
        if fresh and export_dir.is_dir() and not any(export_dir.iterdir()):
            export_dir.rmdir()


def _export(args, overrides, export_dir: Path) -> int:
    if overrides:
        raise KslmError("export takes no --config.* overrides: it exports the run as configured in its workdir")
    quant = getattr(args, "quant", None)
    if quant and args.format != "gguf":
        raise KslmError(f"--quant {quant} applies to --format gguf only; {args.format} exports float32 "
                        "(measure int8/int4 with `kslm eval --quant`)")
    if args.format == "gguf":
        quant = quant or "f16"
        out = Path(args.out) if args.out else export_dir / f"model-{quant}.gguf"
        check_out(out, args.format)
        gguf_io.export_gguf(Path(args.workdir), out, quant)
    elif args.format == "onnx":
        out = Path(args.out) if args.out else export_dir / "onnx"
        check_out(out, args.format)
        onnx_io.export_onnx(Path(args.workdir), out)
    else:
        out = Path(args.out) if args.out else export_dir / "hf"
        check_out(out, args.format)
        hf_io.export_hf(Path(args.workdir), out)
    print(f"exported {args.workdir} -> {out} ({args.format})")
    pretokenized = tok_lib.pretokenize(tok_lib.load(workdir_lib.paths(args.workdir)["tokenizer"]))
    if args.format != "gguf" and pretokenized == "jamo":
        print("note: tokenizer.model was trained on the jamo view of Hangul; a plain SentencePiece (or Hugging Face) "
              "encoder does not decompose syllables nor recompose its output; encode and decode with "
              "kslm_jax.data.tokenizer.load() (or kslm_jax.data.jamo.decompose/recompose around it)")
    elif args.format != "gguf" and pretokenized != "none":
        print("note: tokenizer.model was trained on Kiwi morpheme cuts; a plain SentencePiece (or Hugging Face) "
              "encoder still round-trips text but splits differently than training did; encode with "
              "kslm_jax.data.tokenizer.load() to match")
    return 0
