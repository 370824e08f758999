"""`kslm export --format gguf`: a llama.cpp model file (arch `llama`) in F16, Q8_0 or Q4_0.

The SentencePiece vocabulary goes in whole (pieces, scores, token types, byte pieces), padded to the
logits width with unused tokens. llama.cpp's RoPE pairs dimensions (2i, 2i+1) where Hugging Face pairs
(i, i + d/2), so the query and key rows are permuted per head, as llama.cpp's own converter does.
Norm scales stay float32; with Q4_0/Q8_0 the embedding table is quantized too, the output matrix likewise.
Q8_0/Q4_0 quantize rows in blocks of 32: a matrix whose rows are not a multiple of 32 wide stays F16, per
tensor, as llama.cpp's own converter does, rather than refusing the whole model.
"""
from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kslm_jax.core import config as config_lib
from kslm_jax.core import config_finetune
from kslm_jax.core.errors import KslmError
from kslm_jax.data import chat
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import GGUF_KEY
from kslm_jax.model import arch
from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io

QUANTS = ("f16", "q8_0", "q4_0")


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF half-rotation row order → llama.cpp interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(params, c: llama.ModelConfig) -> dict[str, np.ndarray]:
    t = hf.to_hf(params, c)
    out = {"token_embd.weight": t["model.embed_tokens.weight"], "output_norm.weight": t["model.norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = t["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.n_layers):
        for ours, theirs in names.items():
            w = t[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = rope_permute(w, c.n_heads)
            elif theirs == "attn_k":
                w = rope_permute(w, c.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
    return out


def _vocab(sp, size: int, gguf):
    tokens, scores, types = [], [], []
    specials = set(tok_lib.user_defined(sp))
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        if tokens[-1].decode() in specials:  # chat markers: llama.cpp matches them whole, as SentencePiece does
            types.append(gguf.TokenType.USER_DEFINED)
        elif sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(sp.GetPieceSize(), size):  # rows that pad the logits to a multiple; never produced
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1e4)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _tokenizer_spec(sp):
    """(model type, add_dummy_prefix) from the SentencePiece model itself, so imported tokenizers are read
    as they are, not as our config assumes."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    return kind, proto.normalizer_spec.add_dummy_prefix


def write_gguf(params, cfg, sp, path: Path, quant: str = "f16") -> Path:
    try:
        import gguf
    except ImportError:
        raise KslmError("GGUF export needs the gguf package: pip install 'kslm_jax[export]'") from None
    if quant not in QUANTS:
        raise KslmError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    kind, dummy_prefix = _tokenizer_spec(sp)
    if kind != "BPE":
        # llama.cpp's "llama" tokenizer merges pieces by score, which reproduces SentencePiece BPE only.
        raise KslmError(f"the tokenizer is a SentencePiece {kind.lower()} model; GGUF export needs "
                        "tokenizer.model_type=bpe (llama.cpp would split text differently); retrain the "
                        "tokenizer with --config.tokenizer.model_type=bpe, or export --format hf")
    if tok_lib.pretokenize(sp) == "jamo":
        # llama.cpp would look raw syllables up in a vocabulary of jamo, and print jamo it never recomposes.
        raise KslmError("the tokenizer reads Hangul syllables as jamo (tokenizer.pretokenize=jamo), which llama.cpp "
                        "cannot decompose before encoding nor recompose after decoding; GGUF export needs a "
                        "tokenizer trained with --config.tokenizer.pretokenize=none, or export --format hf and "
                        "encode with kslm_jax")
    if tok_lib.pretokenize(sp) != "none":
        # llama.cpp cannot run Kiwi: it would encode across morpheme boundaries the model never saw split that way.
        raise KslmError("the tokenizer cuts text at Kiwi morpheme boundaries (tokenizer.pretokenize=kiwi), which "
                        "llama.cpp cannot do; GGUF export needs a tokenizer trained with "
                        "--config.tokenizer.pretokenize=none, or export --format hf and encode with kslm_jax")
    c = llama.ModelConfig.from_config(cfg)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        w = gguf.GGUFWriter(str(tmp / path.name), arch="llama")
        w.add_name(path.stem)
        w.add_string(GGUF_KEY, "kslm_jax")  # the marker that lets a later export replace this file
        w.add_context_length(max(cfg.data.seq_len, 2048))
        w.add_embedding_length(c.d_model)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.d_ff)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(ftype)
        tokens, scores, types = _vocab(sp, c.vocab_size, gguf)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_pad_token_id(sp.pad_id())
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(bool(dummy_prefix))
        # Our chat format, so llama.cpp's server (and other GGUF runtimes) render chats as kslm serve --backend
        # jax does; an SFT answer ends at the template's closing marker, which llama.cpp then treats as an end.
        w.add_chat_template(chat.chat_template(cfg))
        if cfg.finetune.kind in config_finetune.TEMPLATED:
            marks = tok_lib.find_special(cfg.finetune.template)
            if marks:
                w.add_eot_token_id(sp.PieceToId(marks[-1]))
        for name, arr in gguf_tensors(params, c).items():
            arr = np.ascontiguousarray(arr, np.float32)
            if arr.ndim == 1:
                w.add_tensor(name, arr)
            elif qtype == gguf.GGMLQuantizationType.F16 or arr.shape[-1] % 32:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except OSError as e:  # numpy's tofile reports a full disk as a short write, without an errno
            if e.errno is None and "requested and" in str(e):
                raise OSError(errno.ENOSPC, f"No space left on device ({e})", str(path)) from None
            raise
        (tmp / path.name).replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_gguf(workdir: Path, out: Path, quant: str) -> Path:
    cfg = config_lib.read_workdir_config(workdir)
    arch.require_decoder(cfg, "kslm export --format gguf")
    sp = tok_lib.check_workdir(cfg, workdir)
    params = finetune_io.restore_params_host(cfg, workdir)
    return write_gguf(params, cfg, sp, out, quant)
