"""`kslm prune`: a smaller student initialized from a trained teacher (Minitron-style), then distilled.

Depth: keep the layers named, every other layer, or the N layers of highest block influence. Width: keep
the MLP channels, attention heads and embedding channels of highest importance (train/importance.py),
all measured once on calibration batches of the teacher's training stream. Grouped-query attention stays
consistent: whole KV groups are kept by the summed importance of their query heads, then the best query
heads inside each kept group. The output is a workdir: config.json (the teacher's with the new shape and
any overrides), the teacher's tokenizer, hard links to its token shards, prune.json, and a step-0
checkpoint, so `kslm train --workdir OUT` (with or without a distill section) starts from it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from kslm_jax.compress import importance
from kslm_jax.core import checkpoint, sharding
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline
from kslm_jax.model import arch, llama
from kslm_jax.objectives import finetune_io
from kslm_jax.train import optim
from kslm_jax.train import state as state_lib

log = logging.getLogger("kslm")

LAYER_RULES = ("importance", "every_other")


def top(scores, n: int) -> np.ndarray:
    """Indices of the n largest scores, in their original order (ties to the lower index)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:n]
    return np.sort(order)


def select_layers(n_total: int, bi, keep=None, n_layers=None, by: str = "importance") -> list[int]:
    if keep:
        bad = [i for i in keep if not 0 <= i < n_total]
        if bad or len(set(keep)) != len(keep):
            raise KslmError(f"--keep-layers {','.join(map(str, keep))}: layers are 0..{n_total - 1}, each once")
        return sorted(keep)
    if not n_layers:
        return list(range(n_total))
    if not 1 <= n_layers <= n_total:
        raise KslmError(f"--n-layers {n_layers} must be in 1..{n_total} (the teacher's depth)")
    if by == "every_other":
        return sorted({i * n_total // n_layers for i in range(n_layers)})
    return top(bi, n_layers).tolist()


def select_heads(head_scores, n_kv: int, new_heads: int, new_kv: int):
    """(query head ids, kv head ids) to keep in one layer; query heads listed group by group."""
    n_heads = len(head_scores)
    group, new_group = n_heads // n_kv, new_heads // new_kv
    kv = top(np.asarray(head_scores).reshape(n_kv, group).sum(1), new_kv)
    heads = [g * group + j for g in kv for j in top(head_scores[g * group:(g + 1) * group], new_group)]
    return np.asarray(heads), kv


def _check_shape(c: llama.ModelConfig, d_model, d_ff, n_heads, n_kv) -> None:
    for name, new, old in (("--d-model", d_model, c.d_model), ("--d-ff", d_ff, c.d_ff),
                           ("--n-heads", n_heads, c.n_heads), ("--n-kv-heads", n_kv, c.n_kv_heads)):
        if not 1 <= new <= old:
            raise KslmError(f"{name} {new} must be in 1..{old} (the teacher's): pruning only removes")
    if n_heads % n_kv or n_heads // n_kv > c.n_heads // c.n_kv_heads:
        raise KslmError(f"--n-heads {n_heads} / --n-kv-heads {n_kv}: needs a multiple of the KV heads with at most "
                        f"{c.n_heads // c.n_kv_heads} query heads per KV head (the teacher's grouping)")


def prune_params(params: dict, c: llama.ModelConfig, scores: dict, layers, d_model, d_ff, n_heads, n_kv):
    """Numpy parameters of the pruned model (per-layer list) and what was kept."""
    emb = top(scores["emb"], d_model)
    out_layers, kept = [], {"layers": list(map(int, layers)), "heads": [], "kv_heads": []}
    for i, p in zip(range(c.n_layers), importance.layers_of(params, c)):
        if i not in layers:
            continue
        heads, kv = select_heads(scores["head"][i], c.n_kv_heads, n_heads, n_kv)
        ff = top(scores["mlp"][i], d_ff)
        kept["heads"].append(heads.tolist())
        kept["kv_heads"].append(kv.tolist())
        a, m = p["self_attn"], p["mlp"]
        out_layers.append({
            "input_layernorm": {"scale": p["input_layernorm"]["scale"][emb]},
            "post_attention_layernorm": {"scale": p["post_attention_layernorm"]["scale"][emb]},
            "self_attn": {
                "q_proj": {"kernel": a["q_proj"]["kernel"][emb][:, heads]},
                "k_proj": {"kernel": a["k_proj"]["kernel"][emb][:, kv]},
                "v_proj": {"kernel": a["v_proj"]["kernel"][emb][:, kv]},
                "o_proj": {"kernel": a["o_proj"]["kernel"][heads][..., emb]},
            },
            "mlp": {
                "gate_proj": {"kernel": m["gate_proj"]["kernel"][emb][:, ff]},
                "up_proj": {"kernel": m["up_proj"]["kernel"][emb][:, ff]},
                "down_proj": {"kernel": m["down_proj"]["kernel"][ff][:, emb]},
            },
        })
    rest = {"embed_tokens": {"embedding": params["embed_tokens"]["embedding"][:, emb]},
            "norm": {"scale": params["norm"]["scale"][emb]}}
    if not c.tie_embeddings:
        rest["lm_head"] = {"kernel": params["lm_head"]["kernel"][emb]}
    kept["embed_channels"] = int(len(emb))
    return rest, out_layers, kept


def _layout(rest: dict, layers: list[dict], scanned: bool) -> dict:
    if scanned:
        return dict(rest, layers=jax.tree.map(lambda *a: np.stack(a), *layers))
    return dict(rest, **{f"layers_{i}": p for i, p in enumerate(layers)})


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links where the file system allows (token shards are large and never rewritten in place)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=link)


def _save_step0(cfg, out: Path, params) -> None:
    model = llama.Transformer(llama.ModelConfig.from_config(cfg))
    tx, _ = optim.make(cfg.optim, cfg.train.steps)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh, rules)
    if jax.tree.structure(abstract.params) != jax.tree.structure(params) or \
            [a.shape for a in jax.tree.leaves(abstract.params)] != [np.shape(a) for a in jax.tree.leaves(params)]:
        raise KslmError("the pruned weights do not fit the output config; do not override model.* shape keys "
                        "with --config (use --n-layers, --d-model, --d-ff, --n-heads, --n-kv-heads)")
    with jax.set_mesh(mesh):
        params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), params), shardings.params)
        state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                     opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                                     rng=jax.random.PRNGKey(cfg.train.seed),
                                     fp8_meta=state_lib.fresh_fp8_meta(model, mesh, shardings, rules))
        with checkpoint.manager(workdir_lib.paths(out)["checkpoints"], cfg.checkpoint) as mngr:
            checkpoint.save(mngr, 0, state, None, force=True)
            mngr.wait_until_finished()
            checkpoint.seal(mngr)


def prune(teacher: Path, out: Path, *, keep_layers=None, n_layers=None, by: str = "importance", d_model=None,
          d_ff=None, n_heads=None, n_kv_heads=None, calib_batches: int = 8, overrides=(), force=False) -> dict:
    teacher, out = Path(teacher), Path(out)
    tcfg = config_lib.read_workdir_config(teacher)
    arch.require_decoder(tcfg, "kslm prune")
    c = llama.ModelConfig.from_config(tcfg)
    d_model, d_ff = d_model or c.d_model, d_ff or c.d_ff
    n_heads, n_kv = n_heads or c.n_heads, n_kv_heads or c.n_kv_heads
    _check_shape(c, d_model, d_ff, n_heads, n_kv)
    if workdir_lib.paths(out)["checkpoints"].is_dir() and any(workdir_lib.paths(out)["checkpoints"].iterdir()):
        raise KslmError(f"{workdir_lib.paths(out)['checkpoints']} already holds checkpoints; prune into a new --workdir")
    if calib_batches < 1:
        raise KslmError(f"--calib-batches {calib_batches} must be at least 1")
    params = finetune_io.restore_params_host(config_lib.read_workdir_config(teacher), teacher)
    tp = workdir_lib.paths(teacher)
    data = iter(pipeline.train_dataset(tp["tokens"], tcfg.data, tcfg.train.batch_size))
    batches = [next(data) for _ in range(calib_batches)]
    scores = importance.measure(params, c, batches)
    layers = select_layers(c.n_layers, scores["bi"], keep_layers, n_layers, by)
    rest, new_layers, kept = prune_params(params, c, scores, layers, d_model, d_ff, n_heads, n_kv)

    cfg = config_lib.read_workdir_config(teacher)
    with cfg.unlocked():
        m = cfg.model
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = d_model, len(layers), n_heads, n_kv, d_ff
        m.head_dim = 0 if d_model // n_heads == c.head_dim and d_model % n_heads == 0 else c.head_dim
    for item in overrides:
        config_lib.apply_override(cfg, item)
    config_lib.validate(cfg)
    workdir_lib.bind(out, cfg, force)
    op = workdir_lib.paths(out)
    op["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
    for f in tp["tokenizer"].parent.iterdir():
        if f.is_file():
            shutil.copy2(f, op["tokenizer"].parent / f.name)
    _link_tree(tp["tokens"], op["tokens"])
    _save_step0(cfg, out, _layout(rest, new_layers, cfg.model.scan_layers))
    report = {"teacher": str(teacher.resolve()), "calibration_tokens": int(sum((b["segment_ids"] > 0).sum()
                                                                             for b in batches)),
              "block_influence": [round(float(x), 6) for x in scores["bi"]], "kept": kept,
              "shape": {"d_model": d_model, "n_layers": len(layers), "n_heads": n_heads, "n_kv_heads": n_kv,
                        "d_ff": d_ff},
              "params": {"teacher": int(llama.param_count(params)),
                         "student": int(llama.param_count(_layout(rest, new_layers, True)))}}
    workdir_lib.atomic_write_text(out / "prune.json", json.dumps(report, indent=1) + "\n")
    return report
