"""`kslm train` with finetune.kind=dpo: preference tuning (DPO or IPO) of a trained model, full or LoRA.

It is a fine-tuning objective (objectives/finetune.py: state layout, base loading, LoRA, merge and export)
with preference pairs for data (data/preference_data.py) and the loss of objectives/preference.py. The
frozen reference is finetune.init_from's newest checkpoint, held as the distillation teacher is: bf16 in the
step's read-only `extra`, run forward only (a LoRA run keeps its adapters' base beside it; the reference is a
separate bf16 copy so both kinds of run compare against the same reference). A resumed run refuses a base that
trained on since it started, so the reference never changes under it.
TensorBoard: train/loss, train/reward_margin, train/chosen_reward, train/rejected_reward, train/chosen_logp,
train/rejected_logp and train/accuracy (per-pair means), and the same on the held-out pairs under eval/, with
the held-out response perplexity of the policy and of the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import jax
import numpy as np

from kslm_jax.core import distributed
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, packing, pipeline, preference_data
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import llama, lora
from kslm_jax.objectives import finetune, finetune_eval, finetune_io, preference
from kslm_jax.train import loop
from kslm_jax.train import objective as objective_lib

log = logging.getLogger("kslm")


class Preference(finetune.Finetune):
    """The preference-tuning Objective: the fine-tuning state and base, pairs for data, a frozen reference."""

    base_must_not_move = True  # the reference is the base

    def __init__(self, setup: objective_lib.Setup):
        self.setup = s = setup
        cfg, workdir = s.cfg, s.workdir
        f = cfg.finetune
        self.cfg, self.workdir = cfg, workdir
        self.base_dir = Path(f.init_from)
        finetune_io.adopt_tokenizer(self.base_dir, workdir)
        self.sp = tok_lib.check_workdir(cfg, workdir)
        self.data = preference_data.build(cfg, self.sp)
        self.pairs = preference_data.max_pairs(cfg.data.max_segments_per_row)
        self.word_ids, self._base, self.samples = None, None, None
        self.abstract, self.shardings = finetune_io.state_shapes(cfg, s.model, s.tx, s.mesh, s.rules)
        self.ref_model = llama.Transformer(dataclasses.replace(s.model_cfg, dtype="bfloat16",
                                                               param_dtype="bfloat16", remat="none"))
        self.loss = preference.loss(self.forward, self.ref_model, self.pairs, f.dpo_beta, f.dpo_loss)
        extra, shardings = self._frozen_base()
        ref, ref_shardings = self._reference()
        self.extra = dict(extra or {}, reference=ref)
        self.extra_shardings = dict(shardings or {}, reference=ref_shardings)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self._merge = jax.jit(lambda base, ad: lora.merge(base, ad, cfg.lora.alpha / max(cfg.lora.rank, 1)))
        self._rows = pipeline._host_slice(cfg.train.batch_size, cfg.train.grad_accum)
        self._policy_stats = jax.jit(functools.partial(_policy_stats, self.forward, self.pairs))
        self._ref_stats = jax.jit(functools.partial(_ref_stats, self.ref_model, self.pairs))
        self._ref_cache = {}  # held-out index set -> the frozen reference's log-probs, computed at its first eval
        rep = self.data.report()
        if distributed.is_primary():
            workdir_lib.atomic_write_text(workdir / "finetune_data.json",
                                          json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        log.info("dpo data: %d train / %d held-out pairs (%s); loss %s, beta %g", rep["train"]["pairs"],
                 rep["val"]["pairs"], ", ".join(f"{k} {v}" for k, v in rep["train"].items()
                                                if k not in ("records", "pairs", "tokens")) or "none left out",
                 f.dpo_loss, f.dpo_beta)
        if not len(self.data.train.pairs):
            raise KslmError(f"every training pair of {f.train_files} is over data.seq_len={cfg.data.seq_len} "
                            "positions; raise it or set finetune.too_long=truncate")

    def _reference(self):
        """The base's decoder as bf16 arrays on the mesh, sharded like the policy's decoder."""
        s = self.setup
        host = self._base_host()
        shapes, shardings = finetune_io.decoder_shapes(self.ref_model, s.mesh, s.rules)
        finetune_io.check_base_fits(host, shapes, self.base_dir)
        return jax.device_put(finetune_io.base_for_lora(host, "bfloat16"), shardings), shardings

    def batches(self):
        cfg = self.cfg
        stream = examples.ExampleStream(self.data.train.pairs, cfg.train.batch_size, cfg.data.seq_len, self.pairs,
                                        cfg.data.seed, fill_fn=preference_data.fill)
        return packing.Prefetch(stream, cfg.data.workers) if cfg.data.workers > 0 else stream

    def eval_indices(self) -> np.ndarray:
        n, cap = len(self.data.val.pairs), self.cfg.finetune.eval_examples
        if not cap or cap >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))

    def pair_logps(self, state, idx) -> dict:
        """Per held-out pair (in `idx` order): summed response log-probs and token counts, policy and reference.
        The reference is frozen, so its forward pass runs at the first evaluation of an index set only."""
        cfg = self.cfg
        key = np.asarray(idx, np.int64).tobytes()
        ref = self._ref_cache.get(key)
        keys = ("pi_c", "pi_r", "n_c", "n_r") + (("ref_c", "ref_r") if ref is None else ())
        out = {k: np.zeros(len(idx)) for k in keys}
        pos = {int(e): i for i, e in enumerate(idx)}
        with jax.set_mesh(self.setup.mesh):
            for batch, plan in examples.one_pass(self.data.val.pairs, cfg.train.batch_size, cfg.data.seq_len,
                                                 self.pairs, idx, fill_fn=preference_data.fill):
                got = self._policy_stats(state.params, self.extra, batch)
                if ref is None:
                    got = dict(got, **self._ref_stats(self.extra["reference"], batch))
                got = jax.device_get(got)  # every process: all rows
                for r, row in enumerate(plan):
                    for j, e in enumerate(row):
                        for k in out:
                            out[k][pos[e]] = got[k][r, j]
        if ref is None:
            ref = self._ref_cache[key] = {k: out[k] for k in ("ref_c", "ref_r")}
        return dict(out, **ref)

    def evaluate(self, state) -> dict:
        idx = self.eval_indices()
        if not len(idx):
            log.warning("no held-out pairs: raise finetune.val_fraction or give finetune.val_files")
            return {}
        return summarize(self.pair_logps(state, idx), self.cfg.finetune.dpo_beta, self.cfg.finetune.dpo_loss)


def _policy_stats(policy_forward, pairs, params, extra, batch) -> dict:
    logits = policy_forward(params, extra, batch)
    pi_c, pi_r, n_c, n_r, _ = preference.response_logps(logits, batch, pairs)
    return {"pi_c": pi_c, "pi_r": pi_r, "n_c": n_c, "n_r": n_r}


def _ref_stats(ref_model, pairs, ref_params, batch) -> dict:
    ref_c, ref_r = preference.reference_logps(ref_model, ref_params, batch, pairs)
    return {"ref_c": ref_c, "ref_r": ref_r}


def summarize(lp: dict, beta: float, kind: str) -> dict:
    """Held-out means per pair, in float64, and the response perplexity of the policy and of the reference
    (both sides' tokens): its ratio is how far the policy drifted from the reference on held-out text."""
    h = (lp["pi_c"] - lp["ref_c"]) - (lp["pi_r"] - lp["ref_r"])
    loss = np.logaddexp(0.0, -beta * h) if kind == "dpo" else (h - 1.0 / (2.0 * beta)) ** 2
    tokens = float(lp["n_c"].sum() + lp["n_r"].sum())
    nll = -(lp["pi_c"].sum() + lp["pi_r"].sum()) / max(tokens, 1.0)
    ref_nll = -(lp["ref_c"].sum() + lp["ref_r"].sum()) / max(tokens, 1.0)
    return {"loss": float(loss.mean()), "accuracy": float((h > 0).mean()), "reward_margin": float(beta * h.mean()),
            "chosen_reward": float(beta * (lp["pi_c"] - lp["ref_c"]).mean()),
            "rejected_reward": float(beta * (lp["pi_r"] - lp["ref_r"]).mean()),
            "chosen_logp": float(lp["pi_c"].mean()), "rejected_logp": float(lp["pi_r"].mean()),
            "perplexity": math.exp(min(nll, 50.0)), "reference_perplexity": math.exp(min(ref_nll, 50.0)),
            "perplexity_drift": math.exp(min(nll - ref_nll, 50.0)), "pairs": len(h), "tokens": int(tokens)}


def trainer(cfg, workdir) -> loop.Trainer:
    """The loop with the preference objective."""
    return loop.Trainer(Preference(objective_lib.Setup.of(cfg, workdir)))


def train(cfg, workdir) -> int:
    """`kslm train` for finetune.kind=dpo."""
    return finetune_eval.fit_and_report(trainer(cfg, workdir))
