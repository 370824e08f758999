"""What a fine-tuning workdir holds and how its model is read back: the state layout, the base it starts
from, the decoder it amounts to (adapters merged), `kslm merge-lora`, and `kslm generate` with its template.

State params of a fine-tuning run: {"model": decoder} (full fine-tuning) or {"adapters": LoRA A/B}
(the base then lives in the step's read-only `extra`), plus {"head": ...} for a linear classifier.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core import checkpoint, config_finetune, sharding
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import arch, classify, llama, lora
from kslm_jax.train import optim
from kslm_jax.train import state as state_lib

log = logging.getLogger("kslm")


def n_classes(cfg) -> int:
    return len([x for x in cfg.finetune.labels.split(",") if x.strip()])


def has_head(cfg) -> bool:
    return cfg.finetune.kind == "cls" and cfg.finetune.head == "linear"


def state_init(cfg, model: llama.Transformer, tx):
    """The initializer of a fine-tuning TrainState (decoder weights random until the base is loaded)."""
    lo = cfg.lora

    def init():
        rng = jax.random.PRNGKey(cfg.train.seed)
        decoder = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, 8), jnp.int32))["params"]
        params = {}
        if lo.rank:
            params["adapters"] = lora.init(jax.random.fold_in(rng, 2), nn.unbox(decoder),
                                           config_finetune.lora_targets(cfg), lo.rank)
        else:
            params["model"] = decoder
        if has_head(cfg):
            params["head"] = classify.init_head(jax.random.fold_in(rng, 3), model.c.d_model, n_classes(cfg))
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                    rng=jax.random.fold_in(rng, 1))
    return init


def state_shapes(cfg, model, tx, mesh, rules):
    """Abstract state and shardings: the decoder sharded by its logical axes, adapters and head replicated."""
    boxed = jax.eval_shape(state_init(cfg, model, tx))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def decoder_shapes(model, mesh, rules):
    """(shapes, shardings) of a plain decoder's parameters."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return nn.unbox(boxed), sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)


def newest_step(workdir: Path) -> int | None:
    ck = workdir_lib.paths(workdir)["checkpoints"]
    steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit()] if ck.is_dir() else []
    return max(steps) if steps else None


def base_params_host(base_dir: Path) -> tuple[dict, int]:
    """The decoder of any trained workdir (plain, or itself fine-tuned) as float32 numpy, and its step."""
    step = newest_step(base_dir)
    if step is None:
        raise KslmError(f"config key finetune.init_from={base_dir}: no checkpoint there; train it first")
    return restore_params_host(config_lib.read_workdir_config(base_dir), base_dir), step


def check_base_fits(host, abstract_tree, base_dir) -> None:
    got = jax.tree_util.tree_flatten_with_path(host)[0]
    want = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    bad = [f"{jax.tree_util.keystr(k)} {tuple(np.shape(a))} vs {tuple(b.shape)}"
           for (k, a), (_, b) in zip(got, want) if tuple(np.shape(a)) != tuple(b.shape)]
    if bad or jax.tree.structure(host) != jax.tree.structure(abstract_tree):
        raise KslmError(f"finetune.init_from={base_dir}: its weights do not fit this model "
                        f"({'; '.join(bad[:3]) or 'parameter names differ'}); keep the base's model.* keys")


def adopt_tokenizer(base_dir: Path | None, workdir: Path) -> None:
    """The run uses its base's tokenizer: copied in once, and refused if a different one is already there."""
    mine = workdir_lib.paths(workdir)["tokenizer"]
    if base_dir is None:
        return
    theirs = workdir_lib.paths(base_dir)["tokenizer"]
    if not theirs.is_file():
        raise KslmError(f"finetune.init_from={base_dir} has no tokenizer ({theirs})")
    if mine.is_file():
        if mine.read_bytes() != theirs.read_bytes():
            raise KslmError(f"{mine} differs from the tokenizer of finetune.init_from={base_dir}; "
                            "fine-tune in a new --workdir")
        return
    mine.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(theirs, mine)


def base_for_lora(host: dict, base_dtype: str) -> dict:
    if base_dtype == "int8":
        return lora.quantize_base(host)
    if base_dtype == "bfloat16":
        return jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), host)
    return host


def lm_params_host(cfg, workdir: Path, with_head: bool = False):
    """The decoder a fine-tuning workdir amounts to, as float32 numpy: its tuned weights, or its base with
    the adapters merged (onto the same int8/bf16 base the adapters were trained against); with_head: also
    the linear classifier head (or None)."""
    with cfg.unlocked():
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(cfg.mesh)
    model = llama.Transformer(llama.ModelConfig.from_config(cfg))
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    abstract, _ = state_shapes(cfg, model, tx, mesh, sharding.rules(cfg.mesh.rules))
    with jax.set_mesh(mesh):
        _, state = checkpoint.restore_params(workdir_lib.paths(workdir)["checkpoints"], abstract)
    head = state.params.get("head")
    if head is not None and not with_head:
        log.warning("the classification head of %s is not part of the decoder written here (a label-word "
                    "classifier, finetune.head=label_words, needs none)", workdir)
    if not cfg.lora.rank:
        decoder = state.params["model"]
    elif not cfg.finetune.init_from:
        raise KslmError(f"{workdir} holds LoRA adapters but no finetune.init_from to merge them into")
    else:
        base, _ = base_params_host(Path(cfg.finetune.init_from))
        decoder = lora.merge(base_for_lora(base, cfg.lora.base_dtype), state.params["adapters"],
                             cfg.lora.alpha / cfg.lora.rank)
    decoder = jax.tree.map(lambda x: np.asarray(x, np.float32), decoder)
    if with_head:
        return decoder, None if head is None else jax.tree.map(np.asarray, head)
    return decoder


def save_plain(cfg, params: dict, out: Path, force: bool = False) -> None:
    """A plain (pretraining-kind) workdir at step 0 holding `params`: eval, generate and export read it."""
    plain = config_lib.from_dict(config_lib.to_dict(cfg))
    with plain.unlocked():
        plain.finetune.kind, plain.finetune.init_from = "none", ""
        plain.lora.rank, plain.lora.base_dtype = 0, "float32"
        plain.mesh.data = 1
    config_lib.validate(plain)
    p = workdir_lib.paths(out)
    if p["checkpoints"].is_dir() and any(p["checkpoints"].iterdir()):
        raise KslmError(f"{p['checkpoints']} already holds checkpoints; write the merged model to a new --out")
    workdir_lib.bind(out, plain, force)
    model = llama.Transformer(llama.ModelConfig.from_config(plain))
    tx, _ = optim.make(plain.optim, plain.train.steps)
    mesh = sharding.make_mesh(plain.mesh)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, plain.train.seed, mesh)
    check_base_fits(params, abstract.params, out)
    params = jax.device_put(params, shardings.params)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                                 rng=jax.random.PRNGKey(plain.train.seed))
    with checkpoint.manager(p["checkpoints"], plain.checkpoint) as mngr:
        checkpoint.save(mngr, 0, state, None, force=True)
        mngr.wait_until_finished()
        checkpoint.seal(mngr)


def merge_lora(workdir: Path, out: Path, force: bool = False) -> dict:
    cfg = config_lib.read_workdir_config(workdir)
    if not cfg.lora.rank:
        raise KslmError(f"{workdir} is not a LoRA run (lora.rank=0); export or evaluate it directly")
    params = lm_params_host(cfg, workdir)
    save_plain(cfg, params, out, force)
    p_in, p_out = workdir_lib.paths(workdir), workdir_lib.paths(out)
    p_out["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(p_in["tokenizer"], p_out["tokenizer"])
    info = {"from": str(workdir), "base": cfg.finetune.init_from, "step": newest_step(workdir),
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "base_dtype": cfg.lora.base_dtype}
    workdir_lib.atomic_write_text(out / "merged_from.json", json.dumps(info, indent=2) + "\n")
    return info


def restore_params_host(cfg, workdir: Path) -> dict:
    """The newest checkpoint's parameters as float32 numpy arrays (one device is enough to export)."""
    if cfg.finetune.kind != "none":  # fine-tuned: the tuned decoder, or LoRA adapters merged into their base
            return lm_params_host(cfg, workdir)
    with cfg.unlocked():
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(cfg.mesh)
    model = arch.from_config(cfg)[1]  # a plain run may be recurrent (kslm eval --tasks reads it here)
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    abstract, _ = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh, sharding.rules(cfg.mesh.rules))
    with jax.set_mesh(mesh):
        _, state = checkpoint.restore_params(workdir_lib.paths(workdir)["checkpoints"], abstract)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), state.params)
