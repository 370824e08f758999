"""`kslm train` with finetune.kind=sft|cls: supervised fine-tuning and sequence classification, full or LoRA.

The one training loop runs it (checkpoints, resume, signals, NaN handling, TensorBoard); this objective
gives the data (whole examples packed into rows, data/finetune_data.py), the state (finetune_io.state_init),
the loss and the evaluation (objectives/finetune_eval.py). Under LoRA the state holds only the adapters, so the
optimizer moments and the checkpoints are adapter-sized; the base (float32, bfloat16 or int8) is the step's
read-only `extra`, and adapter dropout draws its masks from the step's key (seed, step, micro-batch).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from kslm_jax.core import checkpoint, distributed, sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, finetune_data, packing, pipeline
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import scoring
from kslm_jax.model import classify, llama, lora
from kslm_jax.objectives import finetune_eval, finetune_io
from kslm_jax.train import loop
from kslm_jax.train import objective as objective_lib
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")


def decoder(lo, params, extra):
    """The tree the output kernel is read from (LoRA never adapts lm_head or the embedding)."""
    return extra["base"] if lo.rank else params["model"]


def forward(model, lo, params, extra, batch, rng=None, *, hidden: bool = False):
    """Logits (or final hidden states) of a fine-tuning state; with `rng`, LoRA dropout is on."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if not lo.rank:
        return model.apply({"params": params["model"]}, *args, return_hidden=hidden)
    train = rng is not None and lo.dropout > 0
    with lora.intercept(lo.alpha / lo.rank, lo.dropout if train else 0.0):
        return model.apply({"params": lora.combine(extra["base"], params["adapters"])}, *args, return_hidden=hidden,
                           rngs={"dropout": rng} if train else None)


def sft_loss(model, cfg):
    """Summed response-token CE (+ z-loss) of a packed SFT batch; aux["tokens"] counts the response tokens."""
    z_loss, chunk, lo = cfg.train.z_loss, cfg.train.loss_chunk, cfg.lora

    def loss(params, extra, batch, rng):
        mask = step_lib.loss_mask(batch)
        t = batch["inputs"].shape[-1]
        if chunk and chunk < t and t % chunk == 0:
            h = forward(model, lo, params, extra, batch, rng, hidden=True)
            kernel = llama.output_kernel(decoder(lo, params, extra), model.c)
            ce_sum, z_sum = step_lib.chunked_loss_sums(h, kernel, batch["targets"], mask, z_loss, chunk)
        else:
            ce, z = step_lib.token_losses(forward(model, lo, params, extra, batch, rng), batch["targets"], mask,
                                          z_loss)
            ce_sum, z_sum = ce.sum(), z.sum()
        return ce_sum + z_sum, {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": mask.sum()}
    return loss


def cls_loss(model, cfg, word_ids=None):
    """Summed CE of the examples of a packed classification batch; aux["tokens"] counts the examples."""
    lo, how = cfg.lora, classify.pool_of(cfg)

    def loss(params, extra, batch, rng):
        h = forward(model, lo, params, extra, batch, rng, hidden=True)
        scores = classify.logits(classify.pool(h, batch, how), decoder(lo, params, extra),
                                 params.get("head"), word_ids, model.c)
        sums = classify.loss_sums(scores, batch["cls_label"])
        return sums["ce_sum"], sums
    return loss


class Finetune:
    """The SFT / classification Objective, full or LoRA (see train/objective.py for the contract)."""

    # LoRA adapters train on the base, so it may not move under a resumed run; a subclass whose loss reads the
    # base too (DPO's reference) says so here.
    base_must_not_move = False

    def __init__(self, setup: objective_lib.Setup):
        self.setup = s = setup
        cfg, workdir = s.cfg, s.workdir
        f = cfg.finetune
        self.cfg, self.workdir = cfg, workdir
        self.base_dir = Path(f.init_from) if f.init_from else None
        finetune_io.adopt_tokenizer(self.base_dir, workdir)
        self.sp = tok_lib.check_workdir(cfg, workdir)
        self.data = finetune_data.build(cfg, self.sp)
        self.word_ids = (classify.label_word_ids(self.sp, f.label_words, len(self.data.class_names))
                         if f.kind == "cls" and f.head == "label_words" else None)
        self._base = None
        self.abstract, self.shardings = finetune_io.state_shapes(cfg, s.model, s.tx, s.mesh, s.rules)
        self.loss = sft_loss(s.model, cfg) if f.kind == "sft" else cls_loss(s.model, cfg, self.word_ids)
        self.extra, self.extra_shardings = self._frozen_base()
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.scorer = scoring.Scorer(s.model, cfg.data.seq_len, cfg.train.batch_size, cfg.tokenizer.vocab_size,
                                     cfg.data.max_segments_per_row)
        self._merge = jax.jit(lambda base, ad: lora.merge(base, ad, cfg.lora.alpha / max(cfg.lora.rank, 1)))
        self._rows = pipeline._host_slice(cfg.train.batch_size, cfg.train.grad_accum)
        self.samples = None
        rep = self.data.report()
        if distributed.is_primary():
            workdir_lib.atomic_write_text(workdir / "finetune_data.json",
                                          json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        log.info("%s data: %d train / %d held-out examples (%s)", f.kind, rep["train"]["examples"],
                 rep["val"]["examples"], ", ".join(f"{k} {v}" for k, v in rep["train"].items()
                                                    if k not in ("records", "examples", "tokens", "per_class")) or
                 "none left out")
        p = self.param_report()
        log.info("trainable parameters: %s of %s (%.2f%%); optimizer state %.1f MiB, frozen base %.1f MiB",
                 f"{p['trainable']:,}", f"{p['total']:,}", 100 * p["trainable"] / p["total"],
                 p["optimizer_bytes"] / 2**20, p["frozen_bytes"] / 2**20)

    def init_state(self):
        s = self.setup
        init = finetune_io.state_init(self.cfg, s.model, s.tx)
        with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
            state = jax.jit(lambda: nn.unbox(init()), out_shardings=self.shardings)()
        if "model" in state.params:
            if self.base_dir is None:
                log.warning("finetune.init_from is empty: the decoder starts from random weights")
            else:
                host = self._base_host()
                finetune_io.check_base_fits(host, self.abstract.params["model"], self.base_dir)
                placed = jax.tree.map(lambda x, a, sh: jax.device_put(np.asarray(x).astype(a.dtype), sh),
                                      host, self.abstract.params["model"], self.shardings.params["model"])
                state = state.replace(params=dict(state.params, model=placed))
        return state

    def _frozen_base(self):
        if not self.cfg.lora.rank:
            return None, None
        if self.base_dir is None:
            raise KslmError("lora.rank > 0 needs finetune.init_from: the adapters train on top of that model")
        s = self.setup
        host = self._base_host()
        shapes, dec = finetune_io.decoder_shapes(s.model, s.mesh, s.rules)
        finetune_io.check_base_fits(host, shapes, self.base_dir)
        base = finetune_io.base_for_lora(host, self.cfg.lora.base_dtype)
        shard = _base_shardings(base, dec, s.mesh)
        return {"base": jax.device_put(base, shard)}, {"base": shard}

    def batches(self):
        cfg = self.cfg
        stream = examples.ExampleStream(self.data.train.examples, cfg.train.batch_size, cfg.data.seq_len,
                                        cfg.data.max_segments_per_row, cfg.data.seed)
        # Packing is per-example Python; a background thread keeps it off a small model's step time.
        return packing.Prefetch(stream, cfg.data.workers) if cfg.data.workers > 0 else stream

    def attach(self, batch: dict) -> dict:
        return batch if self._rows is None else self._rows(batch)

    def forward(self, params, extra, batch, rng=None, *, hidden: bool = False):
        return forward(self.setup.model, self.cfg.lora, params, extra, batch, rng, hidden=hidden)

    def _base_host(self) -> dict:
        """The base's decoder (host numpy), loaded once; a resumed LoRA (or preference) run refuses a base
        that moved on since."""
        if self._base is None:
            host, step = finetune_io.base_params_host(self.base_dir)
            record = self.workdir / "finetune_base.json"
            frozen = self.cfg.lora.rank or self.base_must_not_move
            if record.is_file() and frozen and self.setup.has_checkpoint():
                was = json.loads(record.read_text())
                if was.get("step") != step:
                    raise KslmError(f"the run in {self.workdir} started from step {was.get('step')} of "
                                    f"{self.base_dir}, which now has step {step}; fine-tune in a new --workdir")
            elif distributed.is_primary():
                workdir_lib.atomic_write_text(record, json.dumps({"init_from": str(self.base_dir), "step": step}))
            self._base = host
        return self._base

    def lm_params(self, state):
        """Plain decoder parameters on the devices (adapters merged): what tasks and export see."""
        if self.cfg.lora.rank:
            return self._merge(self.extra["base"], state.params["adapters"])
        return state.params["model"]

    def head(self, state):
        return state.params.get("head")

    def param_report(self) -> dict:
        """Parameter counts and the bytes the state and the frozen base take (the memory LoRA saves)."""
        def nbytes(tree):
            return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
        trainable = lora.count(self.abstract.params)
        frozen = 0
        if self.extra is not None:  # the decoder's own size; int8 scales are storage, not parameters
            frozen = lora.count(jax.eval_shape(self.setup.model.init, jax.random.PRNGKey(0),
                                               jax.numpy.zeros((1, 8), int)))
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen,
                "param_bytes": nbytes(self.abstract.params), "optimizer_bytes": nbytes(self.abstract.opt_state),
                "frozen_bytes": 0 if self.extra is None else nbytes(self.extra)}

    def eval_indices(self) -> np.ndarray:
        """The held-out examples evaluated: all, or a fixed random finetune.eval_examples of them (file order
        would favour a few movies or topics)."""
        n, cap = len(self.data.val.examples), self.cfg.finetune.eval_examples
        if not cap or cap >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))

    def evaluate(self, state) -> dict:
        return finetune_eval.evaluate(self, state)


def _base_shardings(base, decoder_shardings, mesh):
    """int8 codes shard like the kernels they replace; their per-channel scales are replicated."""
    def visit(node, sh):
        if isinstance(node, dict):
            if "kernel_int8" in node:
                return {"kernel_int8": sh["kernel"], "kernel_scale": sharding.replicated(mesh)}
            return {k: visit(v, sh[k]) for k, v in node.items()}
        return sh
    return visit(base, decoder_shardings)


def trainer(cfg, workdir) -> loop.Trainer:
    """The loop with the fine-tuning objective."""
    return loop.Trainer(Finetune(objective_lib.Setup.of(cfg, workdir)))


def train(cfg, workdir) -> int:
    """`kslm train` for a fine-tuning config."""
    return finetune_eval.fit_and_report(trainer(cfg, workdir))


def evaluate_workdir(cfg, workdir, make=trainer) -> int:
    """`kslm eval` of a fine-tuning workdir without --tasks: its held-out split, from the newest checkpoint;
    `make` builds the trainer of its kind (objectives/dpo.py passes its own)."""
    t = make(cfg, workdir)
    with jax.set_mesh(t.mesh):
        step, t.state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    result = t.evaluate()
    finetune_eval.print_eval(step, result, 0.0)
    finetune_eval.write_result(t.objective, int(step), result)
    return 0
