"""Held-out evaluation of a fine-tuning objective (objectives/finetune.py) and the files it writes: SFT reports
response loss, perplexity, bits per character and, on greedy answers, ROUGE-L and BLEU; classification reports
accuracy and macro-F1."""
from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np

from kslm_jax.core import distributed
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.data import examples
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import metrics_text
from kslm_jax.model import classify

log = logging.getLogger("kslm")


def evaluate(o, state) -> dict:
    """Held-out metrics of a fine-tuning state: answer loss (and ROUGE-L, BLEU) or accuracy and macro-F1."""
    idx = o.eval_indices()
    if not len(idx):
        log.warning("no held-out examples: raise finetune.val_fraction or give finetune.val_files")
        return {}
    with jax.set_mesh(o.setup.mesh):
        params = o.lm_params(state)
        ex = o.data.val.examples.subset(idx)
        return _eval_sft(o, params, ex, idx) if o.cfg.finetune.kind == "sft" else _eval_cls(o, state, params, ex)


def _eval_sft(o, params, ex, idx) -> dict:
    f, val = o.cfg.finetune, o.data.val
    sums, counts = o.scorer.example_logprobs(params, ex)
    nll, tokens = -float(sums.sum()), int(counts.sum())
    chars = sum(len(val.references[i]) + 1 for i in idx)  # the end marker counts as one character
    out = {"loss": nll / max(tokens, 1), "perplexity": math.exp(min(nll / max(tokens, 1), 50.0)),
           "bits_per_char": nll / math.log(2) / max(chars, 1), "tokens": tokens}
    gen = idx[:f.eval_generate]
    if len(gen):
        stop = {tok_lib.EOS} | ({o.data.end_id} if o.data.end_id is not None else set())
        prompts = [val.prompts[i] for i in gen]
        hyps = [o.sp.DecodeIds(a) for a in o.scorer.greedy(params, prompts, f.max_new_tokens, stop)]
        refs = [val.references[i] for i in gen]
        out.update(rouge_l=metrics_text.rouge_l(refs, hyps), bleu=metrics_text.bleu(refs, hyps))
        o.samples = [{"prompt": o.sp.DecodeIds(p[1:]), "reference": r, "answer": h}
                     for p, r, h in zip(prompts, refs, hyps)]
    return out


def _eval_cls(o, state, params, ex) -> dict:
    head = o.head(state)
    word_ids = None if o.word_ids is None else jax.numpy.asarray(o.word_ids)
    gold, pred, nll = [], [], 0.0
    cfg = o.cfg
    for batch, plan in examples.one_pass(ex, cfg.train.batch_size, cfg.data.seq_len,
                                         cfg.data.max_segments_per_row):
        scores = np.asarray(classify.predict(o.setup.model, params, head, word_ids, batch, classify.pool_of(cfg)),
                            np.float64)
        for r, row in enumerate(plan):
            for j, e in enumerate(row):
                s = scores[r, j]
                gold.append(int(ex.labels[e]))
                pred.append(int(np.argmax(s)))
                nll += float(np.logaddexp.reduce(s) - s[ex.labels[e]])
    return {"loss": nll / len(gold), "accuracy": metrics_text.accuracy(gold, pred),
            "macro_f1": metrics_text.macro_f1(gold, pred), "examples": len(gold)}


def print_eval(step, result, seconds):
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)) and k != "tokens")
    print(f"eval at step {step}: {shown}  ({seconds:.1f}s)")


def peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_result(o, step: int, result: dict) -> None:
    """eval/finetune.json: held-out metrics, parameter counts, memory and the data report (and greedy samples)."""
    if not distributed.is_primary():
        return
    cfg = o.cfg
    out = {"kind": cfg.finetune.kind, "lora_rank": cfg.lora.rank, "step": step, "eval": result,
           "params": o.param_report(), "peak_device_bytes": peak_device_bytes(), "data": o.data.report(),
           "tokenization": metrics_text.TOKENIZATION}
    path = o.setup.paths["eval"] / "finetune.json"
    workdir_lib.atomic_write_text(path, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if o.samples:
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in o.samples)
        workdir_lib.atomic_write_text(path.with_name("finetune_samples.jsonl"), lines)


def fit_and_report(t) -> int:
    """`kslm train` for a fine-tuning trainer `t` (SFT, cls, DPO): evaluations printed as they come, the last one
    written beside the checkpoints."""
    summary = t.fit(on_eval=print_eval)
    if summary.get("eval") is not None:
        write_result(t.objective, summary["step"], summary["eval"])
    return 0
