"""`kslm import`: a local Hugging Face LlamaForCausalLM directory → a workdir at step 0.

The workdir (config.json, tokenizer/, checkpoints/0) is one that train, eval, generate, fine-tuning and
distillation use as they use a trained run. It sits in train/ because what it writes is a TrainState.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

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


# Bounds on a config.json's sizes: far above any Llama this trainer can hold, far below what would make a
# shape computation allocate or overflow before the tensors are compared with it.
_SIZES = {"hidden_size": 1 << 17, "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10,
          "num_key_value_heads": 1 << 10, "head_dim": 1 << 12, "intermediate_size": 1 << 19, "vocab_size": 1 << 22}
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        hc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # missing, not JSON, not UTF-8, nested too deep
        raise KslmError(f"{path} is missing or not JSON ({_first(e)})") from None
    if not isinstance(hc, dict):
        raise KslmError(f"{path} holds a JSON {type(hc).__name__}, not an object; is it a Hugging Face config?")
    if hc.get("model_type") != "llama":
        raise KslmError(f"{hf_dir}: model_type {str(hc.get('model_type'))[:80]!r} is not supported; only llama")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key):
            raise KslmError(f"{hf_dir}: {key}=true is not supported by this model")
    if hc.get("rope_scaling"):
        raise KslmError(f"{hf_dir}: rope_scaling {str(hc['rope_scaling'])[:120]} is not supported")
    out = {}
    for key, limit in _SIZES.items():
        value = hc.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if value is None:
            raise KslmError(f"{path}: {key} is missing; a Llama config gives it")
        if isinstance(value, bool) or not isinstance(value, int):
            raise KslmError(f"{path}: {key}={str(value)[:40]!r} must be a whole number, not a {type(value).__name__}")
        if not 1 <= value <= limit:
            raise KslmError(f"{path}: {key}={value} is outside 1..{limit}")
        out[key] = value
    for key, default in (("rope_theta", 10000.0), ("rms_norm_eps", 1e-5)):
        value = hc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise KslmError(f"{path}: {key}={str(value)[:40]!r} must be a positive finite number")
        out[key] = float(value)
    tie = hc.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise KslmError(f"{path}: tie_word_embeddings={str(tie)[:40]!r} must be true or false")
    out["tie_word_embeddings"] = tie
    heads = out["num_attention_heads"]
    out.setdefault("num_key_value_heads", heads)
    if "head_dim" not in out:
        if out["hidden_size"] % heads:
            raise KslmError(f"{path}: hidden_size={out['hidden_size']} does not divide by num_attention_heads={heads} "
                            "and no head_dim is given")
        out["head_dim"] = out["hidden_size"] // heads
    if heads % out["num_key_value_heads"]:
        raise KslmError(f"{path}: num_attention_heads={heads} is not a multiple of "
                        f"num_key_value_heads={out['num_key_value_heads']}")
    return out


def _expected_shapes(hc: dict) -> dict[str, tuple]:
    """Every tensor the model needs, in Hugging Face's (out, in) layout."""
    d, hd, ff, v = hc["hidden_size"], hc["head_dim"], hc["intermediate_size"], hc["vocab_size"]
    q, kv = hc["num_attention_heads"] * hd, hc["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not hc["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(hc["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({f"{pre}self_attn.q_proj.weight": (q, d), f"{pre}self_attn.k_proj.weight": (kv, d),
                       f"{pre}self_attn.v_proj.weight": (kv, d), f"{pre}self_attn.o_proj.weight": (d, q),
                       f"{pre}mlp.gate_proj.weight": (ff, d), f"{pre}mlp.up_proj.weight": (ff, d),
                       f"{pre}mlp.down_proj.weight": (d, ff), f"{pre}input_layernorm.weight": (d,),
                       f"{pre}post_attention_layernorm.weight": (d,)})
    return shapes


def check_tensors(hf_dir: Path, tensors: dict, hc: dict) -> None:
    """Each tensor's presence, shape, dtype and finiteness, before anything is reshaped: a transposed matrix
    whose sizes multiply out the same would otherwise import as scrambled weights."""
    for name, shape in _expected_shapes(hc).items():
        if name not in tensors:
            raise KslmError(f"{hf_dir}: tensor {name} is missing from the safetensors weights")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise KslmError(f"{hf_dir}: tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if str(t.dtype) not in _FLOATS:
            raise KslmError(f"{hf_dir}: tensor {name} is {t.dtype}; only float weights ({', '.join(_FLOATS)}) are "
                            "imported (quantized checkpoints are not)")
        if not np.isfinite(t).all():
            raise KslmError(f"{hf_dir}: tensor {name} holds NaN or infinite values; the checkpoint is damaged")


def _first(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def import_hf(hf_dir: Path, workdir: Path, force: bool = False, overrides=()) -> Path:
    """A local HF Llama directory (safetensors + config.json + tokenizer.model) → a workdir at step 0.

    Everything is read and checked first; the workdir is written only then, and what this call wrote is
    removed again if writing fails, so a retry never needs --force.
    """
    hc = _read_config(hf_dir)
    sp = tok_lib.load(hf_dir / "tokenizer.model")
    if sp.GetPieceSize() > hc["vocab_size"]:
        raise KslmError(f"{hf_dir}: tokenizer.model has {sp.GetPieceSize()} pieces but the model only "
                        f"{hc['vocab_size']} embedding rows; they do not belong together")
    cfg = config_lib.base_config()
    from_checkpoint = {
        "model.d_model": hc["hidden_size"], "model.n_layers": hc["num_hidden_layers"],
        "model.n_heads": hc["num_attention_heads"], "model.n_kv_heads": hc["num_key_value_heads"],
        "model.head_dim": hc["head_dim"], "model.d_ff": hc["intermediate_size"],
        "model.rope_theta": hc["rope_theta"], "model.norm_eps": hc["rms_norm_eps"],
        "model.tie_embeddings": hc["tie_word_embeddings"], "tokenizer.vocab_size": sp.GetPieceSize(),
        # The logits width must equal the checkpoint's rows, whatever the tokenizer's size.
        "model.vocab_multiple": hc["vocab_size"] if hc["vocab_size"] != sp.GetPieceSize() else 1,
    }
    with cfg.unlocked():
        for key, value in from_checkpoint.items():
            section, name = key.split(".")
            cfg[section][name] = value
        cfg.mesh.data = 1
    for item in overrides:  # e.g. data.sources for the corpus the imported model will see next
        config_lib.apply_override(cfg, item)
    config_lib.validate(cfg)
    p = workdir_lib.paths(workdir)
    if p["checkpoints"].exists() and any(p["checkpoints"].iterdir()):
        raise KslmError(f"{p['checkpoints']} already holds checkpoints; import into a new --workdir")
    tensors = _read_tensors(hf_dir)
    check_tensors(hf_dir, tensors, hc)
    c = llama.ModelConfig.from_config(cfg)
    params = hf.from_hf(tensors, c, scanned=c.scan_layers)
    mesh = sharding.make_mesh(cfg.mesh)
    model = llama.Transformer(c)
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh)
    mismatched = [f"{jax.tree_util.keystr(k)}: {a.shape} vs {b.shape}" for (k, a), b in
                  zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(params))
                  if a.shape != b.shape]
    if mismatched or jax.tree.structure(abstract.params) != jax.tree.structure(params):
        raise KslmError(f"{hf_dir}: tensors do not fit the config: {'; '.join(mismatched[:3]) or 'names differ'}")
    params = jax.tree.map(lambda a, s, sh: jax.device_put(np.asarray(a, s.dtype), sh), params, abstract.params,
                          shardings.params)
    state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                 opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                                 rng=jax.random.PRNGKey(cfg.train.seed),
                                 fp8_meta=state_lib.fresh_fp8_meta(model, mesh, shardings))
    _write(workdir, cfg, force, hf_dir, state)
    return workdir


def _write(workdir: Path, cfg, force: bool, hf_dir: Path, state) -> None:
    p = workdir_lib.paths(workdir)
    made = [q for q in (workdir, p["tokenizer"].parent, p["checkpoints"]) if not q.exists()]
    had_config = (workdir / "config.json").is_file()
    try:
        workdir_lib.bind(workdir, cfg, force)
        p["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hf_dir / "tokenizer.model", p["tokenizer"])
        with checkpoint.manager(p["checkpoints"], cfg.checkpoint) as mngr:
            checkpoint.save(mngr, 0, state, None, force=True)
            mngr.wait_until_finished()
            checkpoint.seal(mngr)
    except BaseException:
        for q in reversed(made):
            shutil.rmtree(q, ignore_errors=True)
        if not had_config and workdir.exists():
            (workdir / "config.json").unlink(missing_ok=True)
        raise
