"""Pretraining: next-token cross-entropy (+ z-loss) on the workdir's token shards, judged on the held-out
split by loss, perplexity and bits per character."""
from __future__ import annotations

import jax

from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline, shards
from kslm_jax.eval import lm as lm_eval
from kslm_jax.train import loop
from kslm_jax.train import objective as objective_lib
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib


# The pretraining loss lives in train/step.py: `kslm compile` lowers the same step without an objective.
loss = step_lib.lm_loss


class LM:
    """The pretraining Objective (see train/objective.py for the contract)."""

    word_ids = None
    extra = extra_shardings = None

    def __init__(self, setup: objective_lib.Setup):
        self.setup = s = setup
        cfg = s.cfg
        # Missing or damaged token shards are refused before anything is compiled.
        self.manifest = shards.read_manifest(s.paths["tokens"])
        if self.manifest["vocab_size"] != cfg.tokenizer.vocab_size:
            raise KslmError(f"token shards in {s.paths['tokens']} use a vocabulary of {self.manifest['vocab_size']} "
                            f"but tokenizer.vocab_size={cfg.tokenizer.vocab_size}; run `kslm tokenize` again")
        for split in ("train", "val"):
            shards.verify(s.paths["tokens"], split, cfg.data.verify_shards)
        self.abstract, self.shardings = state_lib.abstract_and_shardings(s.model, s.tx, cfg.train.seed, s.mesh,
                                                                         s.rules)
        self.loss = loss(s.model, cfg.train.z_loss, cfg.train.loss_chunk, cfg.train.loss_impl)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.eval_step = step_lib.jit_eval_step(s.model, s.mesh, self.shardings.params, s.rules)

    def init_state(self):
        s = self.setup
        return state_lib.create(s.model, s.tx, s.cfg.train.seed, s.mesh, self.shardings, s.rules)

    def batches(self):
        cfg = self.setup.cfg
        return iter(pipeline.train_dataset(self.setup.paths["tokens"], cfg.data, cfg.train.batch_size,
                                           cfg.train.grad_accum))

    def attach(self, batch: dict) -> dict:
        return batch

    def evaluate(self, state) -> dict:
        s = self.setup
        batches = pipeline.eval_batches(s.paths["tokens"], s.cfg.data, s.cfg.train.batch_size,
                                        s.cfg.train.eval_batches)
        total = lm_eval.predicted_tokens(self.manifest["val"], s.cfg.train.eval_batches, s.cfg.train.batch_size,
                                         s.cfg.data.seq_len)
        with jax.set_mesh(s.mesh):
            nll, tokens = lm_eval.run_lm_eval(self.eval_step, state.params, batches, s.mesh, total)
        return lm_eval.summarize(nll, tokens, self.manifest["val"])

    def lm_params(self, state):
        return state.params

    def head(self, state):
        return None


def trainer(cfg, workdir) -> loop.Trainer:
    """The loop with the pretraining objective: `kslm train`, `kslm eval` and `kslm generate` of a plain run."""
    return loop.Trainer(LM(objective_lib.Setup.of(cfg, workdir)))
