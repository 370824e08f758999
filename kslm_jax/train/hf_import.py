"""`kslm import`: a local Hugging Face LlamaForCausalLM directory → a workdir at step 0.

The workdir (config.json, tokenizer/, checkpoints/0) is one that train, eval, generate, fine-tuning and
distillation use as they use a trained run. It sits in train/ because what it writes is a TrainState.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax

from kslm_jax.core import checkpoint, sharding
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama
from kslm_jax.train import optim
from kslm_jax.train import state as state_lib


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
