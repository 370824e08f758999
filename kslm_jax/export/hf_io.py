"""`kslm export --format hf` and `kslm import`: a workdir ↔ a Hugging Face LlamaForCausalLM directory.

Export writes config.json, model.safetensors (sharded with an index past `shard_bytes`), the SentencePiece
model as tokenizer.model with its tokenizer_config.json, and generation_config.json, into a temporary folder
renamed into place only when complete. Import builds a workdir (config.json, tokenizer/, checkpoints/0)
that train, eval, generate and distillation can use.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from kslm_jax import checkpoint, config as config_lib, workdir as workdir_lib
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.errors import KslmError
from kslm_jax.export import hf
from kslm_jax.model import llama

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
    from kslm_jax.train import loop
    cfg = config_lib.read_workdir_config(workdir)
    sp = loop.check_tokenizer(cfg, workdir)
    params = restore_params_host(cfg, workdir)
    c = llama.ModelConfig.from_config(cfg)
    with workdir_lib.atomic_dir(out) as tmp:
        _write_safetensors(hf.to_hf(params, c), tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(c, max(cfg.data.seq_len, 2048)), indent=2))
        shutil.copy(workdir_lib.paths(workdir)["tokenizer"], tmp / "tokenizer.model")
        pieces = {k: sp.IdToPiece(v) for k, v in SPECIAL.items()}
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": pieces["bos"], "eos_token": pieces["eos"], "unk_token": pieces["unk"],
            "pad_token": pieces["pad"], "legacy": False, "add_prefix_space": None,
            "model_max_length": max(cfg.data.seq_len, 2048), "clean_up_tokenization_spaces": False,
        }, indent=2, ensure_ascii=False))
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": tok_lib.BOS, "eos_token_id": tok_lib.EOS, "pad_token_id": tok_lib.PAD,
            "do_sample": True, "temperature": cfg.generate.temperature, "top_k": cfg.generate.top_k,
            "top_p": cfg.generate.top_p}, indent=2))
    return out


def restore_params_host(cfg, workdir: Path) -> dict:
    """The newest checkpoint's parameters as float32 numpy arrays (one device is enough to export)."""
    if cfg.finetune.kind != "none":  # fine-tuned: the tuned decoder, or LoRA adapters merged into their base
        from kslm_jax.train import finetune_io
        return finetune_io.lm_params_host(cfg, workdir)
    from kslm_jax import sharding
    from kslm_jax.train import optim, state as state_lib
    with cfg.unlocked():
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(cfg.mesh)
    model = llama.Transformer(llama.ModelConfig.from_config(cfg))
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    abstract, _ = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh, sharding.rules(cfg.mesh.rules))
    with jax.set_mesh(mesh):
        _, state = checkpoint.restore_params(workdir_lib.paths(workdir)["checkpoints"], abstract)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), state.params)


def _read_tensors(hf_dir: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    index = hf_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        tensors = {}
        for f in files:
            tensors.update(load_file(str(hf_dir / f)))
    # TypeError, AttributeError: an index.json whose weight_map is not a {name: file name} object
    except (OSError, ValueError, KeyError, json.JSONDecodeError, TypeError, AttributeError, SafetensorError) as e:
        raise KslmError(f"cannot read the safetensors weights in {hf_dir} ({e}); is it a complete export?") from None
    return tensors


def import_hf(hf_dir: Path, workdir: Path, force: bool = False, overrides=()) -> Path:
    """A local HF Llama directory (safetensors + config.json + tokenizer.model) → a workdir at step 0."""
    from kslm_jax import sharding
    from kslm_jax.train import optim, state as state_lib
    try:
        hc = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KslmError(f"{hf_dir / 'config.json'} is missing or not JSON ({e})") from None
    if hc.get("model_type") != "llama":
        raise KslmError(f"{hf_dir}: model_type {hc.get('model_type')!r} is not supported; only llama")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key):
            raise KslmError(f"{hf_dir}: {key}=true is not supported by this model")
    if hc.get("rope_scaling"):
        raise KslmError(f"{hf_dir}: rope_scaling {hc['rope_scaling']} is not supported")
    sp = tok_lib.load(hf_dir / "tokenizer.model")
    cfg = config_lib.base_config()
    heads = hc["num_attention_heads"]
    from_checkpoint = {
        "model.d_model": hc["hidden_size"], "model.n_layers": hc["num_hidden_layers"], "model.n_heads": heads,
        "model.n_kv_heads": hc.get("num_key_value_heads", heads),
        "model.head_dim": hc.get("head_dim") or hc["hidden_size"] // heads, "model.d_ff": hc["intermediate_size"],
        "model.rope_theta": float(hc.get("rope_theta", 10000.0)), "model.norm_eps": float(hc.get("rms_norm_eps", 1e-5)),
        "model.tie_embeddings": bool(hc.get("tie_word_embeddings", False)),
        "tokenizer.vocab_size": sp.GetPieceSize(),
        # The logits width must equal the checkpoint's rows, whatever the tokenizer's size.
        "model.vocab_multiple": hc["vocab_size"] if hc["vocab_size"] != sp.GetPieceSize() else 1,
    }
    if sp.GetPieceSize() > hc["vocab_size"]:
        raise KslmError(f"{hf_dir}: tokenizer.model has {sp.GetPieceSize()} pieces but the model only "
                        f"{hc['vocab_size']} embedding rows; they do not belong together")
    with cfg.unlocked():
        for key, value in from_checkpoint.items():
            section, name = key.split(".")
            cfg[section][name] = value
        cfg.mesh.data = 1
    for item in overrides:  # e.g. data.sources for the corpus the imported model will see next
        config_lib.apply_override(cfg, item)
    config_lib.validate(cfg)
    c = llama.ModelConfig.from_config(cfg)
    params = hf.from_hf(_read_tensors(hf_dir), c, scanned=c.scan_layers)
    workdir_lib.bind(workdir, cfg, force)
    p = workdir_lib.paths(workdir)
    p["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "tokenizer.model", p["tokenizer"])
    mesh = sharding.make_mesh(cfg.mesh)
    model = llama.Transformer(c)
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh)
    mismatched = [f"{jax.tree_util.keystr(k)}: {a.shape} vs {b.shape}" for (k, a), b in
                  zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(params))
                  if a.shape != b.shape]
    if mismatched or jax.tree.structure(abstract.params) != jax.tree.structure(params):
        raise KslmError(f"{hf_dir}: tensors do not fit the config: {'; '.join(mismatched[:3]) or 'names differ'}")
    params = jax.device_put(params, shardings.params)
    state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                 opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                                 rng=jax.random.PRNGKey(cfg.train.seed))
    if p["checkpoints"].exists() and any(p["checkpoints"].iterdir()):
        raise KslmError(f"{p['checkpoints']} already holds checkpoints; import into a new --workdir")
    with checkpoint.manager(p["checkpoints"], cfg.checkpoint) as mngr:
        checkpoint.save(mngr, 0, state, None, force=True)
        mngr.wait_until_finished()
        checkpoint.seal(mngr)
    return workdir
