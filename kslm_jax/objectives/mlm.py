"""Masked-LM pretraining of the encoder (model.arch=encoder): BERT's recipe on the decoder's token shards.

Of the real tokens of each packed row (segment id > 0; BOS, EOS and the other control pieces never), mlm.rate
are chosen; a chosen token becomes mlm.token with probability mlm.mask, a random ordinary piece with
mlm.random, and stays itself otherwise (BERT's 80/10/10). With mlm.whole_eojeol the choice is made per eojeol
(a whitespace-delimited word: a piece that starts with '▁' opens one, as do a document start and the piece
after a control piece) and all pieces of a chosen eojeol are chosen; the 80/10/10 replacement stays per
piece, as in BERT's whole-word masking. The loss is the cross-entropy of the original token at the chosen
positions only: summed here, divided by the chosen count of the whole global batch in train/step.py, so
gradient accumulation is exact. Masks come from the step's key (seed, step, micro-batch), so a resumed run
draws the same ones; evaluation draws from a fixed key per held-out batch, the same at every evaluation.
"""
from __future__ import annotations

import functools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from kslm_jax.core import distributed, progress, sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.objectives import lm
from kslm_jax.train import loop
from kslm_jax.train import objective as objective_lib
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")
WORD_MARK = "▁"  # SentencePiece's whitespace: a piece starting with it begins an eojeol


def vocab_tables(sp) -> dict:
    """Per piece id: opens an eojeol, is a control piece (never chosen); and the ordinary pieces a chosen
    token may be replaced by (no control, unknown, byte or user-defined piece)."""
    n = sp.GetPieceSize()
    user = set(tok_lib.user_defined(sp))
    pieces = [sp.IdToPiece(i) for i in range(n)]
    control = np.asarray([sp.IsControl(i) or sp.IsUnknown(i) for i in range(n)], bool)
    is_user = np.asarray([p in user for p in pieces], bool)
    is_byte = np.asarray([sp.IsByte(i) for i in range(n)], bool)
    opens = np.asarray([p.startswith(WORD_MARK) for p in pieces], bool) | control | is_user
    return {"opens": opens, "control": control, "ordinary": np.flatnonzero(~(control | is_user | is_byte))}


def word_starts(tokens, positions, segment_ids, tables):
    """(B, T) True where an eojeol begins: an opening piece, a document (or chunk) start, or after a control."""
    opens, control = jnp.asarray(tables["opens"]), jnp.asarray(tables["control"])
    first = jnp.ones_like(segment_ids[:, :1], bool)
    changed = jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    after_control = jnp.concatenate([first, control[tokens[:, :-1]]], 1)
    return opens[tokens] | (positions == 0) | changed | after_control


def mask_tokens(rng, tokens, positions, segment_ids, tables, mcfg, mask_id: int):
    """(model inputs, chosen) of a packed batch: `chosen` marks the positions the loss reads."""
    k_choose, k_how, k_random = jax.random.split(rng, 3)
    control = jnp.asarray(tables["control"])
    real = (segment_ids > 0) & ~control[tokens]
    u = jax.random.uniform(k_choose, tokens.shape)
    if mcfg.whole_eojeol:
        # Every piece takes the draw of its eojeol's first piece, so an eojeol is chosen whole or not at all.
        idx = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        start = word_starts(tokens, positions, segment_ids, tables)
        u = jnp.take_along_axis(u, jax.lax.cummax(jnp.where(start, idx, 0), axis=1), axis=1)
    chosen = real & (u < mcfg.rate)
    how = jax.random.uniform(k_how, tokens.shape)
    ordinary = jnp.asarray(tables["ordinary"], jnp.int32)
    random_ids = ordinary[jax.random.randint(k_random, tokens.shape, 0, ordinary.shape[0])]
    inputs = jnp.where(chosen & (how < mcfg.mask + mcfg.random), random_ids, tokens)
    inputs = jnp.where(chosen & (how < mcfg.mask), mask_id, inputs)
    return inputs.astype(tokens.dtype), chosen


def chosen_sums(model, params, inputs, targets, chosen, positions, segment_ids, z_loss: float = 0.0):
    """Summed CE (+ z-loss) and correct predictions of `targets` at the `chosen` positions, and their count."""
    logits = model.apply({"params": params}, inputs, positions, segment_ids)
    ce, z = step_lib.token_losses(logits, targets, chosen, z_loss)
    correct = chosen & (jnp.argmax(logits, -1) == targets)
    return {"ce_sum": ce.sum(), "z_sum": z.sum(), "tokens": chosen.sum(),
            "correct_sum": correct.sum().astype(jnp.float32)}


def masked_sums(model, params, batch, rng, tables, mcfg, mask_id: int, z_loss: float = 0.0):
    """chosen_sums of a packed batch masked with `rng`: the original tokens are the targets."""
    pos, seg = batch["positions"], batch["segment_ids"]
    inputs, chosen = mask_tokens(rng, batch["inputs"], pos, seg, tables, mcfg, mask_id)
    return chosen_sums(model, params, inputs, batch["inputs"], chosen, pos, seg, z_loss)


def mlm_loss(model, z_loss: float, tables, mcfg, mask_id: int):
    """The masked-LM loss as an Objective's `loss(params, extra, batch, rng) -> (sum, aux)`."""
    def loss(params, extra, batch, rng):
        del extra
        sums = masked_sums(model, params, batch, rng, tables, mcfg, mask_id, z_loss)
        return sums["ce_sum"] + sums["z_sum"], sums
    return loss


def summarize(ce: float, correct: float, n: int) -> dict:
    if n == 0:
        raise KslmError("the validation split gave no masked token; raise data.val_fraction or add text, then "
                        "prepare again")
    return {"loss": ce / n, "accuracy": correct / n, "perplexity": math.exp(min(ce / n, 50.0)), "tokens": int(n)}


class MLM(lm.LM):
    """The masked-LM Objective: the pretraining data, state and checkpoints of lm.LM, another loss and eval."""

    def __init__(self, setup: objective_lib.Setup):
        super().__init__(setup)
        s, cfg = self.setup, self.setup.cfg
        sp = tok_lib.check_workdir(cfg, s.workdir)
        where = f"config key mlm.token ({s.workdir}/tokenizer)"
        self.mask_id = tok_lib.special_ids(sp, [cfg.mlm.token], where)[cfg.mlm.token]
        self.tables = vocab_tables(sp)
        self.loss = mlm_loss(s.model, cfg.train.z_loss, self.tables, cfg.mlm, self.mask_id)
        fn = functools.partial(masked_sums, s.model, tables=self.tables, mcfg=cfg.mlm, mask_id=self.mask_id)
        self.eval_step = jax.jit(fn, in_shardings=(self.shardings.params, sharding.batch_sharding(s.mesh), None),
                                 out_shardings=sharding.replicated(s.mesh))

    def evaluate(self, state) -> dict:
        s, cfg = self.setup, self.setup.cfg
        batches = pipeline.eval_batches(s.paths["tokens"], cfg.data, cfg.train.batch_size, cfg.train.eval_batches)
        key = jax.random.PRNGKey(cfg.train.seed)
        ce = correct = 0.0
        n = 0
        with jax.set_mesh(s.mesh), progress.bar(None, "eval", "batch") as shown:
            for i, b in enumerate(batches):
                out = jax.device_get(self.eval_step(state.params, sharding.global_batch(b, s.mesh, 1),
                                                    jax.random.fold_in(key, i)))
                ce, correct, n = ce + float(out["ce_sum"]), correct + float(out["correct_sum"]), n + int(out["tokens"])
                shown.update(1)
        return summarize(ce, correct, n)


def trainer(cfg, workdir) -> loop.Trainer:
    """The loop with the masked-LM objective: `kslm train` and `kslm eval` of an encoder run."""
    return loop.Trainer(MLM(objective_lib.Setup.of(cfg, workdir)))


def format_eval(step, result: dict) -> str:
    return (f"masked LM at step {step}: loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  "
            f"ppl {result['perplexity']:.2f}  ({result['tokens']:,} masked tokens)")


def write_eval(workdir, step: int, result: dict) -> None:
    if distributed.is_primary():
        workdir_lib.atomic_write_text(workdir_lib.paths(workdir)["eval"] / "mlm.json",
                                      json.dumps({"step": step, **result}, indent=2) + "\n")


def train(cfg, workdir) -> int:
    """`kslm train` of an encoder: the loop, an evaluation line at each evaluation, eval/mlm.json at the end."""
    t = trainer(cfg, workdir)
    summary = t.fit(on_eval=lambda step, result, seconds: print(format_eval(step, result), flush=True))
    if summary.get("eval"):
        write_eval(workdir, summary["step"], summary["eval"])
    return 0
