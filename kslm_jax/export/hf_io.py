"""`kslm export --format hf`: a workdir → a Hugging Face LlamaForCausalLM directory (import: train/hf_import.py),
or for an encoder (model.arch=encoder) an EuroBertForMaskedLM one: transformers' Llama blocks with bidirectional
attention under the same tensor names, so its forward is ours without any code shipped (README: Encoder).

It writes config.json, model.safetensors (sharded with an index past `shard_bytes`), the SentencePiece
model as tokenizer.model with its tokenizer_config.json, and generation_config.json, into a temporary folder
renamed into place only when complete. Import builds a workdir (config.json, tokenizer/, checkpoints/0)
that train, eval, generate and distillation can use.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import write_marker
from kslm_jax.model import arch
from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io

SPECIAL = {"pad": tok_lib.PAD, "unk": tok_lib.UNK, "bos": tok_lib.BOS, "eos": tok_lib.EOS}


def hf_config(c: llama.ModelConfig, max_positions: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": tok_lib.BOS, "eos_token_id": tok_lib.EOS, "pad_token_id": tok_lib.PAD,
    }


def encoder_config(c: llama.ModelConfig, max_positions: int, mask_id: int | None = None) -> dict:
    """EuroBERT's config for our encoder: the Llama fields, no biases, our RoPE base; `bos` pooling is our
    finetune.pool=first (its classifier adds a dense layer ours lacks, so only the masked-LM body is exported)."""
    return {
        "architectures": ["EuroBertForMaskedLM"], "model_type": "eurobert",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rms_norm_eps": c.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32", "classifier_pooling": "bos", "mask_token_id": mask_id,
        "bos_token_id": tok_lib.BOS, "eos_token_id": tok_lib.EOS, "pad_token_id": tok_lib.PAD,
    }


def _write_safetensors(tensors: dict, out: Path, shard_bytes: int) -> None:
    from safetensors.numpy import save_file
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], np.float32)
        if current and size + arr.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2))


def export_hf(workdir: Path, out: Path, shard_bytes: int = 5 * 2**30) -> Path:
    try:  # checked before any work, as gguf and onnx check their packages
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise KslmError("HF export needs the safetensors package: pip install 'kslm_jax[export]'") from None
    cfg = config_lib.read_workdir_config(workdir)
    arch.require_blocks(cfg, "kslm export --format hf")
    sp = tok_lib.check_workdir(cfg, workdir)
    params = finetune_io.restore_params_host(cfg, workdir)
    c = llama.ModelConfig.from_config(cfg)
    positions = max(cfg.data.seq_len, 2048)
    tok_extra = {}
    if c.causal:
        model_cfg = hf_config(c, positions)
    else:
        mask_id = tok_lib.special_ids(sp, [cfg.mlm.token], "config key mlm.token")[cfg.mlm.token]
        model_cfg, tok_extra = encoder_config(c, positions, mask_id), {"mask_token": cfg.mlm.token}
    with workdir_lib.atomic_dir(out) as tmp:
        _write_safetensors(hf.to_hf(params, c), tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(model_cfg, indent=2))
        shutil.copy(workdir_lib.paths(workdir)["tokenizer"], tmp / "tokenizer.model")
        pieces = {k: sp.IdToPiece(v) for k, v in SPECIAL.items()}
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": pieces["bos"], "eos_token": pieces["eos"], "unk_token": pieces["unk"],
            "pad_token": pieces["pad"], "legacy": False, "add_prefix_space": None,
            "model_max_length": positions, "clean_up_tokenization_spaces": False, **tok_extra,
        }, indent=2, ensure_ascii=False))
        if c.causal:  # an encoder fills masks; it has no sampling settings
            (tmp / "generation_config.json").write_text(json.dumps({
                "bos_token_id": tok_lib.BOS, "eos_token_id": tok_lib.EOS, "pad_token_id": tok_lib.PAD,
                "do_sample": True, "temperature": cfg.generate.temperature, "top_k": cfg.generate.top_k,
                "top_p": cfg.generate.top_p}, indent=2))
        write_marker(tmp, "hf")
    return out
