"""`kslm train` with finetune.kind=sft|cls: supervised fine-tuning and sequence classification, full or LoRA.

The pretraining loop runs unchanged (checkpoints, resume, signals, NaN handling, TensorBoard); this subclass
swaps the data (whole examples packed into rows, train/finetune_data.py), the state (finetune_io.state_init),
the objective and the evaluation. Under LoRA the state holds only the adapters, so the optimizer moments and
the checkpoints are adapter-sized; the base (float32, bfloat16 or int8) is the step's read-only `extra`.
Evaluation: SFT reports held-out response loss, perplexity, bits per character and, on greedy answers,
ROUGE-L and BLEU; classification reports accuracy and macro-F1 on the held-out split.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from kslm_jax.core import checkpoint, distributed, sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, finetune_data, packing, pipeline
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import metrics_text, scoring
from kslm_jax.model import classify, llama, lora
from kslm_jax.objectives import finetune_io
from kslm_jax.train import loop
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")


class FinetuneTrainer(loop.Trainer):
    def __init__(self, cfg, workdir):
        workdir = Path(workdir)
        f = cfg.finetune
        self.base_dir = Path(f.init_from) if f.init_from else None
        finetune_io.adopt_tokenizer(self.base_dir, workdir)
        self.sp = tok_lib.check_workdir(cfg, workdir)
        self.data = finetune_data.build(cfg, self.sp)
        self.word_ids = (classify.label_word_ids(self.sp, f.label_words, len(self.data.class_names))
                         if f.kind == "cls" and f.head == "label_words" else None)
        self._base = None
        super().__init__(cfg, workdir)
        self.scorer = scoring.Scorer(self.model, cfg.data.seq_len, cfg.train.batch_size, cfg.tokenizer.vocab_size,
                                     cfg.data.max_segments_per_row)
        self._merge = jax.jit(lambda base, ad: lora.merge(base, ad, cfg.lora.alpha / max(cfg.lora.rank, 1)))
        self._rows = pipeline._host_slice(cfg.train.batch_size, cfg.train.grad_accum)
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

    # -- seams of loop.Trainer ------------------------------------------------------------------------
    def check_data(self) -> None:
        self.manifest = None  # examples come from finetune.train_files, read in __init__

    def state_shapes(self):
        return finetune_io.state_shapes(self.cfg, self.model, self.tx, self.mesh, self.rules)

    def init_fresh(self) -> None:
        init = finetune_io.state_init(self.cfg, self.model, self.tx)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            state = jax.jit(lambda: nn.unbox(init()), out_shardings=self.shardings)()
        if "model" in state.params:
            if self.base_dir is None:
                log.warning("finetune.init_from is empty: the decoder starts from random weights")
            else:
                host = self._base_host()
                finetune_io.check_base_fits(host, self.abstract.params["model"], self.base_dir)
                placed = jax.tree.map(lambda x, a, s: jax.device_put(np.asarray(x).astype(a.dtype), s),
                                      host, self.abstract.params["model"], self.shardings.params["model"])
                state = state.replace(params=dict(state.params, model=placed))
        self.state, self.start_step = state, 0

    def build_extra(self):
        if not self.cfg.lora.rank:
            return None, None
        if self.base_dir is None:
            raise KslmError("lora.rank > 0 needs finetune.init_from: the adapters train on top of that model")
        host = self._base_host()
        shapes, dec = finetune_io.decoder_shapes(self.model, self.mesh, self.rules)
        finetune_io.check_base_fits(host, shapes, self.base_dir)
        base = finetune_io.base_for_lora(host, self.cfg.lora.base_dtype)
        shard = _base_shardings(base, dec, self.mesh)
        return {"base": jax.device_put(base, shard)}, {"base": shard}

    def build_loss(self):
        cfg = self.cfg
        z_loss, chunk, c = cfg.train.z_loss, cfg.train.loss_chunk, self.model_cfg

        def sft_loss(params, extra, batch):
            mask = step_lib.loss_mask(batch)
            t = batch["inputs"].shape[-1]
            if chunk and chunk < t and t % chunk == 0:
                hidden = self._forward(params, extra, batch, train=True, hidden=True)
                kernel = llama.output_kernel(self._decoder(params, extra), c)
                ce_sum, z_sum = step_lib.chunked_loss_sums(hidden, kernel, batch["targets"], mask, z_loss, chunk)
            else:
                ce, z = step_lib.token_losses(self._forward(params, extra, batch, train=True), batch["targets"],
                                              mask, z_loss)
                ce_sum, z_sum = ce.sum(), z.sum()
            n = mask.sum()
            return (ce_sum + z_sum) / jax.numpy.maximum(n, 1), {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": n}

        def cls_loss(params, extra, batch):
            hidden = self._forward(params, extra, batch, train=True, hidden=True)
            scores = classify.logits(classify.gather(hidden, batch["cls_index"]), self._decoder(params, extra),
                                     params.get("head"), self.word_ids, c)
            sums = classify.loss_sums(scores, batch["cls_label"])
            return sums["ce_sum"] / jax.numpy.maximum(sums["tokens"], 1), sums

        return sft_loss if cfg.finetune.kind == "sft" else cls_loss

    def train_iterator(self):
        cfg = self.cfg
        stream = examples.ExampleStream(self.data.train.examples, cfg.train.batch_size, cfg.data.seq_len,
                                        cfg.data.max_segments_per_row, cfg.data.seed,
                                        extra_seed=cfg.lora.rank > 0 and cfg.lora.dropout > 0)
        # Packing is per-example Python; a background thread keeps it off a small model's step time.
        return packing.Prefetch(stream, cfg.data.workers) if cfg.data.workers > 0 else stream

    def next_batch(self, data_iter) -> dict:
        batch = next(data_iter)
        return batch if self._rows is None else self._rows(batch)

    # -- the model under fine-tuning ------------------------------------------------------------------
    def _decoder(self, params, extra):
        """The tree the output kernel is read from (LoRA never adapts lm_head or the embedding)."""
        return extra["base"] if self.cfg.lora.rank else params["model"]

    def _forward(self, params, extra, batch, *, train: bool = False, hidden: bool = False):
        lo = self.cfg.lora
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        if not lo.rank:
            return self.model.apply({"params": params["model"]}, *args, return_hidden=hidden)
        rng = None
        if train and lo.dropout > 0:
            rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.train.seed), batch["dropout_seed"][0])
        with lora.intercept(lo.alpha / lo.rank, lo.dropout if train else 0.0, rng):
            return self.model.apply({"params": lora.combine(extra["base"], params["adapters"])}, *args,
                                    return_hidden=hidden)

    def _base_host(self) -> dict:
        """The base's decoder (host numpy), loaded once; a LoRA run refuses a base that moved on since."""
        if self._base is None:
            host, step = finetune_io.base_params_host(self.base_dir)
            record = self.workdir / "finetune_base.json"
            if record.is_file() and self.cfg.lora.rank and self.has_checkpoint():
                was = json.loads(record.read_text())
                if was.get("step") != step:
                    raise KslmError(f"the adapters in {self.workdir} were trained on step {was.get('step')} of "
                                    f"{self.base_dir}, which now has step {step}; fine-tune in a new --workdir")
            elif distributed.is_primary():
                workdir_lib.atomic_write_text(record, json.dumps({"init_from": str(self.base_dir), "step": step}))
            self._base = host
        return self._base

    def lm_params(self):
        """Plain decoder parameters on the devices (adapters merged): what tasks and export see."""
        if self.cfg.lora.rank:
            return self._merge(self.extra["base"], self.state.params["adapters"])
        return self.state.params["model"]

    def param_report(self) -> dict:
        """Parameter counts and the bytes the state and the frozen base take (the memory LoRA saves)."""
        def nbytes(tree):
            return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
        trainable = lora.count(self.abstract.params)
        frozen = 0
        if self.extra is not None:  # the decoder's own size; int8 scales are storage, not parameters
            frozen = lora.count(jax.eval_shape(self.model.init, jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), int)))
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen,
                "param_bytes": nbytes(self.abstract.params), "optimizer_bytes": nbytes(self.abstract.opt_state),
                "frozen_bytes": 0 if self.extra is None else nbytes(self.extra)}

    # -- evaluation -----------------------------------------------------------------------------------
    def eval_indices(self) -> np.ndarray:
        """The held-out examples evaluated: all, or a fixed random finetune.eval_examples of them (file order
        would favour a few movies or topics)."""
        n, cap = len(self.data.val.examples), self.cfg.finetune.eval_examples
        if not cap or cap >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))

    def evaluate(self) -> dict:
        idx = self.eval_indices()
        if not len(idx):
            log.warning("no held-out examples: raise finetune.val_fraction or give finetune.val_files")
            return {}
        with jax.set_mesh(self.mesh):
            params = self.lm_params()
            ex = self.data.val.examples.subset(idx)
            return self._eval_sft(params, ex, idx) if self.cfg.finetune.kind == "sft" else self._eval_cls(params, ex)

    def _eval_sft(self, params, ex, idx) -> dict:
        f, val = self.cfg.finetune, self.data.val
        sums, counts = self.scorer.example_logprobs(params, ex)
        nll, tokens = -float(sums.sum()), int(counts.sum())
        chars = sum(len(val.references[i]) + 1 for i in idx)  # the end marker counts as one character
        out = {"loss": nll / max(tokens, 1), "perplexity": math.exp(min(nll / max(tokens, 1), 50.0)),
               "bits_per_char": nll / math.log(2) / max(chars, 1), "tokens": tokens}
        gen = idx[:f.eval_generate]
        if len(gen):
            stop = {tok_lib.EOS} | ({self.data.end_id} if self.data.end_id is not None else set())
            prompts = [val.prompts[i] for i in gen]
            hyps = [self.sp.DecodeIds(a) for a in self.scorer.greedy(params, prompts, f.max_new_tokens, stop)]
            refs = [val.references[i] for i in gen]
            out.update(rouge_l=metrics_text.rouge_l(refs, hyps), bleu=metrics_text.bleu(refs, hyps))
            self.samples = [{"prompt": self.sp.DecodeIds(p[1:]), "reference": r, "answer": h}
                            for p, r, h in zip(prompts, refs, hyps)]
        return out

    def _eval_cls(self, params, ex) -> dict:
        head = self.state.params.get("head")
        word_ids = None if self.word_ids is None else jax.numpy.asarray(self.word_ids)
        gold, pred, nll = [], [], 0.0
        cfg = self.cfg
        for batch, plan in examples.one_pass(ex, cfg.train.batch_size, cfg.data.seq_len,
                                             cfg.data.max_segments_per_row):
            scores = np.asarray(classify.predict(self.model, params, head, word_ids, batch), np.float64)
            for r, row in enumerate(plan):
                for j, e in enumerate(row):
                    s = scores[r, j]
                    gold.append(int(ex.labels[e]))
                    pred.append(int(np.argmax(s)))
                    nll += float(np.logaddexp.reduce(s) - s[ex.labels[e]])
        return {"loss": nll / len(gold), "accuracy": metrics_text.accuracy(gold, pred),
                "macro_f1": metrics_text.macro_f1(gold, pred), "examples": len(gold)}


def _base_shardings(base, decoder_shardings, mesh):
    """int8 codes shard like the kernels they replace; their per-channel scales are replicated."""
    def visit(node, sh):
        if isinstance(node, dict):
            if "kernel_int8" in node:
                return {"kernel_int8": sh["kernel"], "kernel_scale": sharding.replicated(mesh)}
            return {k: visit(v, sh[k]) for k, v in node.items()}
        return sh
    return visit(base, decoder_shardings)


def print_eval(step, result, seconds):
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)) and k != "tokens")
    print(f"eval at step {step}: {shown}  ({seconds:.1f}s)")


def peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_result(trainer, step: int, result: dict) -> None:
    """eval/finetune.json: held-out metrics, parameter counts, memory and the data report (and greedy samples)."""
    if not distributed.is_primary():
        return
    cfg = trainer.cfg
    out = {"kind": cfg.finetune.kind, "lora_rank": cfg.lora.rank, "step": step, "eval": result,
           "params": trainer.param_report(), "peak_device_bytes": peak_device_bytes(), "data": trainer.data.report(),
           "tokenization": metrics_text.TOKENIZATION}
    path = trainer.paths["eval"] / "finetune.json"
    workdir_lib.atomic_write_text(path, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if getattr(trainer, "samples", None):
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in trainer.samples)
        workdir_lib.atomic_write_text(path.with_name("finetune_samples.jsonl"), lines)


def train(cfg, workdir) -> int:
    """`kslm train` for a fine-tuning config."""
    trainer = FinetuneTrainer(cfg, workdir)
    summary = trainer.fit(on_eval=print_eval)
    if summary.get("eval") is not None:
        write_result(trainer, summary["step"], summary["eval"])
    return 0


def evaluate_workdir(cfg, workdir) -> int:
    """`kslm eval` of a fine-tuning workdir without --tasks: its held-out split, from the newest checkpoint."""
    trainer = FinetuneTrainer(cfg, workdir)
    with jax.set_mesh(trainer.mesh):
        step, trainer.state = checkpoint.restore_params(trainer.paths["checkpoints"], trainer.abstract)
    result = trainer.evaluate()
    print_eval(step, result, 0.0)
    write_result(trainer, int(step), result)
    return 0
