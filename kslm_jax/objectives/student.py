"""`kslm train` with a `distill` section: the student learns from a teacher's predictions and the data.

The data, state and evaluation are pretraining's (objectives/lm.py); this objective changes the loss
(objectives/distill.py), puts the teacher's bf16 weights in the step's read-only `extra` input, and, with
distill.cache, adds the stored teacher top-k to each batch instead of running the teacher.
TensorBoard shows train/loss (the ground-truth CE), train/kd (the distillation term per token, T² included)
and train/top1 (how often the student's most likely token is the teacher's).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import llama
from kslm_jax.objectives import distill, distill_cache, lm
from kslm_jax.objectives import teacher as teacher_lib
from kslm_jax.train import loop
from kslm_jax.train import objective as objective_lib
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")
# The teacher checkpoint step a run started with, kept in its workdir so that a resume uses the same one.
TEACHER_PIN = "distill_teacher.json"


def enabled(cfg) -> bool:
    return bool(cfg.distill.teacher or cfg.distill.cache)


def distill_loss(model, cfg, teacher_model=None):
    """`loss(params, extra, batch, rng)`: alpha * KD + (1 - alpha) * CE (+ z-loss), summed over the batch's
    counted tokens (the step divides by their count over the global batch); the sums are in aux.

    The teacher's view comes from `extra["teacher"]` (online) or from the batch's teacher_logp/teacher_ids
    (the offline cache); KD is over the whole vocabulary when distill.topk is 0, else over the top k.
    """
    d = cfg.distill
    n_vocab, k, z_loss = cfg.tokenizer.vocab_size, d.topk, cfg.train.z_loss

    def loss(params, extra, batch, rng):
        del rng  # neither model has dropout
        mask = step_lib.loss_mask(batch)
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        ce, z = step_lib.token_losses(logits, batch["targets"], mask, z_loss)
        student = logits[..., :n_vocab]  # vocabulary padding is no token: left out of the KD term
        if "teacher_logp" in batch:
            logp_t, ids = batch["teacher_logp"], batch["teacher_ids"]
        else:
            t = teacher_lib.logits(teacher_model, extra["teacher"], batch, n_vocab)
            if k:
                logp_t, ids = distill.teacher_topk(t, k)
        if k:
            kd = distill.kd_topk(student, logp_t, ids, mask, d.loss, d.beta, d.temperature)
            top1 = ids[..., 0]  # top_k sorts descending
        else:
            kd = distill.kd_full(student, t, mask, d.loss, d.beta, d.temperature)
            top1 = jnp.argmax(t, axis=-1).astype(jnp.int32)
        agree = distill.top1_agreement(student, top1, mask)
        tokens = mask.sum()
        sums = {"ce_sum": ce.sum(), "z_sum": z.sum(), "kd_sum": kd.sum(), "top1_sum": agree.sum()}
        return distill.mixed(sums["ce_sum"], sums["kd_sum"], sums["z_sum"], d.alpha), dict(sums, tokens=tokens)
    return loss


class Distill:
    """The distillation Objective: pretraining's data, state and evaluation, the mixed loss, the teacher."""

    word_ids = None

    def __init__(self, setup: objective_lib.Setup):
        cfg = setup.cfg
        if not enabled(cfg):
            raise KslmError("distillation needs --config.distill.teacher=PATH (or distill.cache)")
        self.setup, self.workdir = setup, setup.workdir
        self.cache = self.teacher = None
        if cfg.distill.cache:
            self.cache = distill_cache.Reader(distill_cache.folder(setup.workdir, cfg.distill.cache), cfg)
        else:
            self.teacher = teacher_lib.resolve(cfg, setup.workdir)
        base = lm.LM(setup)
        self.abstract, self.shardings, self.tokens_per_step = base.abstract, base.shardings, base.tokens_per_step
        self.init_state, self.batches, self.evaluate = base.init_state, base.batches, base.evaluate
        self.lm_params, self.head = base.lm_params, base.head
        teacher_model = None if self.teacher is None else llama.Transformer(self.teacher.model_cfg)
        self.loss = distill_loss(setup.model, cfg, teacher_model)
        self.extra, self.extra_shardings = self._teacher_params()

    def _teacher_params(self):
        if self.teacher is None:
            return None, None
        step = self._pinned_teacher_step()
        try:
            params, shardings, step = teacher_lib.load_params(self.teacher, self.setup.mesh, self.setup.rules, step)
        except KslmError as e:
            if step is None:
                raise
            raise KslmError(f"this run started with the teacher's checkpoint step {step}, which cannot be read "
                            f"now ({e}); restore that step, or start the student over in a new workdir") from None
        self._pin_teacher_step(step)
        n = llama.param_count(params)
        log.info("teacher %s: checkpoint step %d, %.1fM parameters, forward only in bfloat16",
                 self.teacher.workdir, step, n / 1e6)
        return {"teacher": params}, {"teacher": shardings}

    def _pinned_teacher_step(self) -> int | None:
        """The teacher step this run began with: a resumed student must see the teacher it started with,
        even if the teacher's workdir has trained on since."""
        pin = self.workdir / TEACHER_PIN
        if not pin.is_file():
            return None
        saved = json.loads(pin.read_text())
        return saved["step"] if saved.get("teacher") == str(Path(self.teacher.workdir).resolve()) else None

    def _pin_teacher_step(self, step: int) -> None:
        self.teacher_step = step
        if jax.process_index() == 0:
            workdir_lib.atomic_write_text(self.workdir / TEACHER_PIN, json.dumps(
                {"teacher": str(Path(self.teacher.workdir).resolve()), "step": step}) + "\n")

    def attach(self, batch: dict) -> dict:
        return batch if self.cache is None else self.cache.attach(batch)


def trainer(cfg, workdir) -> loop.Trainer:
    """The loop with the distillation objective."""
    return loop.Trainer(Distill(objective_lib.Setup.of(cfg, workdir)))
