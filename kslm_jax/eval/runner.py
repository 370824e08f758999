"""`kslm eval --tasks`, task evaluation during training, and `kslm generate` for fine-tuned workdirs.

Each task writes <workdir>/eval/<task>.json and TensorBoard scalars eval/<task>/<metric>, and gets one row
of the printed table. Multiple choice reports accuracy from summed log-likelihoods, accuracy_norm from
log-likelihood per character of the choice, and macro-F1 of the summed predictions.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from kslm_jax.core import config_finetune, distributed, metrics
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, finetune_data, records
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import metrics_text, scoring, tasks
from kslm_jax.model import classify, llama

FEWSHOT_SEED = 1234


@dataclasses.dataclass
class Subject:
    """The model under evaluation: plain decoder parameters (adapters merged), tokenizer and config."""
    cfg: object
    model: llama.Transformer
    params: dict
    sp: object
    scorer: scoring.Scorer
    head: dict | None = None
    word_ids: np.ndarray | None = None


def make_subject(cfg, model, params, sp, head=None, word_ids=None) -> Subject:
    rows = cfg.eval.batch_size
    scorer = scoring.Scorer(model, cfg.data.seq_len, rows, cfg.tokenizer.vocab_size, cfg.data.max_segments_per_row)
    return Subject(cfg, model, params, sp, scorer, head, word_ids)


def _read(path: str, limit: int):
    recs = list(records.read(path))
    if not recs:
        raise KslmError(f"{path}: no records")
    return recs[:limit] if limit else recs


def run_task(s: Subject, kind: str, path: str, fewshot: str | None = None, shots: int = 0, limit: int = 0) -> dict:
    out = {"kind": kind, "file": str(path)}
    if kind in tasks.MULTIPLE_CHOICE:
        qs = tasks.questions(kind, _read(path, limit))
        fs = tasks.questions(kind, _read(fewshot, 0)) if fewshot and shots else []
        out.update(_multiple_choice(s, qs, fs, shots))
    elif kind == "ppl":
        out.update(_perplexity(s, path, limit))
    elif kind == "korsts":
        out.update(_sts(s, tasks.sts_pairs(_read(path, limit))))
    elif kind == "cls":
        out.update(_classify(s, path, limit))
    else:
        out.update(_generate(s, path, limit))
    return out


def _multiple_choice(s: Subject, qs, fs, shots: int) -> dict:
    contexts = []
    for i, q in enumerate(qs):
        prefix = ""
        if fs:
            pick = np.random.default_rng([FEWSHOT_SEED, i]).choice(len(fs), min(shots, len(fs)), replace=False)
            prefix = "".join(f"{fs[j].context} {fs[j].choices[fs[j].gold]}\n\n" for j in pick)
        contexts.append(prefix + q.context)
    ctx_ids = s.sp.Encode(contexts, out_type=int)
    choice_ids = s.sp.Encode([c for q in qs for c in q.choices], out_type=int)
    requests, k = [], 0
    for q, ctx in zip(qs, ctx_ids):
        for _ in q.choices:
            requests.append(([tok_lib.BOS, *ctx], choice_ids[k]))
            k += 1
    sums, _ = s.scorer.loglik(s.params, requests)
    gold, pred, pred_norm, k = [], [], [], 0
    for q in qs:
        ll = sums[k:k + len(q.choices)]
        k += len(q.choices)
        gold.append(q.gold)
        pred.append(int(np.argmax(ll)))
        pred_norm.append(int(np.argmax(ll / np.asarray([max(len(c), 1) for c in q.choices]))))
    return {"n": len(qs), "accuracy": metrics_text.accuracy(gold, pred),
            "accuracy_norm": metrics_text.accuracy(gold, pred_norm), "macro_f1": metrics_text.macro_f1(gold, pred),
            "shots": shots if fs else 0, "chance": float(np.mean([1 / len(q.choices) for q in qs])),
            **_one_class(pred, gold, "choice")}


def _one_class(pred: list[int], gold: list[int], what: str) -> dict:
    """A warning when every prediction is the same class: the accuracy is then that class's share of the
    file, which says nothing about the model (an untrained or collapsed one does exactly this)."""
    if len(pred) < 2 or len(set(pred)) > 1:
        return {}
    share = sum(g == pred[0] for g in gold) / len(gold)
    return {"warning": f"every prediction is {what} {pred[0]} (its share of the gold labels: {share:.3f}); "
                       "the accuracy measures the label balance, not the model"}


def _documents(path: str, limit: int) -> list[str]:
    p = Path(path)
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise KslmError(f"{p}: file not found")
        docs = [d.strip() for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        docs = [tasks.Rec("ppl", w, r).text("text") for w, r in records.read(p)]
    if not docs:
        raise KslmError(f"{path}: no text")
    return docs[:limit] if limit else docs


def _perplexity(s: Subject, path: str, limit: int) -> dict:
    """Every document as [BOS] text [EOS], cut into windows of seq_len predictions; EOS counts as one character
    (the accounting of `kslm eval` on the validation split)."""
    docs = _documents(path, limit)
    t = s.cfg.data.seq_len
    requests = []
    for ids in s.sp.Encode(docs, out_type=int):
        ids = [tok_lib.BOS, *ids, tok_lib.EOS]
        for start in range(0, len(ids) - 1, t):
            piece = ids[start:start + t + 1]
            requests.append((piece[:1], piece[1:]))
    sums, counts = s.scorer.loglik(s.params, requests)
    nll, n = -float(sums.sum()), int(counts.sum())
    chars = sum(len(d) + 1 for d in docs)
    nbytes = sum(len(d.encode("utf-8")) + 1 for d in docs)
    return {"n": len(docs), "tokens": n, "loss": nll / n, "perplexity": math.exp(min(nll / n, 50.0)),
            "bits_per_char": nll / math.log(2) / chars, "bits_per_byte": nll / math.log(2) / nbytes}


def _sts(s: Subject, triples) -> dict:
    enc = lambda texts: [[tok_lib.BOS, *x] for x in s.sp.Encode(texts, out_type=int)]
    a = s.scorer.mean_states(s.params, enc([x for x, _, _ in triples]))
    b = s.scorer.mean_states(s.params, enc([y for _, y, _ in triples]))
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    gold = [g for _, _, g in triples]
    return {"n": len(triples), "pearson": metrics_text.pearson(cos, gold), "spearman": metrics_text.spearman(cos, gold),
            "method": "cosine of the mean final hidden states of the two sentences (no training on KorSTS)"}


def _classify(s: Subject, path: str, limit: int) -> dict:
    f = s.cfg.finetune
    if f.kind != "cls":
        raise KslmError("task cls needs a workdir fine-tuned with finetune.kind=cls (its classifier scores the file)")
    names = finetune_data.class_names(s.cfg)
    bins = finetune_data.parse_bins(f.label_bins, names) if f.label_bins else []
    items, outside = [], 0
    for where, rec in _read(path, limit):
        r = tasks.Rec("cls", where, rec)
        label = finetune_data.label_of(rec.get(f.label_field), names, bins)
        if label is None:
            r.fail(f"label {f.label_field}={rec.get(f.label_field)!r} is not one of {', '.join(names)} "
                   + ("nor a number in finetune.label_bins" if bins else "nor a class index"))
        if label < 0:
            outside += 1  # between the label bins (NSMC ratings 5-8): not part of the task
            continue
        items.append((r.text(f.text_field), label))
    tmpl = finetune_data.Template(f.cls_template, s.sp, "config key finetune.cls_template")
    split = finetune_data.cls_split(items, tmpl, s.sp, s.cfg.data.seq_len, "truncate", collections.Counter())
    ex = split.examples
    gold, pred = [], []
    wid = None if s.word_ids is None else jax.numpy.asarray(s.word_ids)
    for batch, plan in examples.one_pass(ex, s.scorer.rows, s.cfg.data.seq_len, s.cfg.data.max_segments_per_row):
        scores = np.asarray(classify.predict(s.model, s.params, s.head, wid, batch, classify.pool_of(s.cfg)))
        for r, row in enumerate(plan):
            for j, e in enumerate(row):
                gold.append(int(ex.labels[e]))
                pred.append(int(np.argmax(scores[r, j])))
    majority = max(collections.Counter(gold).values()) / len(gold) if gold else 0.0
    return {"n": len(gold), "accuracy": metrics_text.accuracy(gold, pred),
            "macro_f1": metrics_text.macro_f1(gold, pred), "outside_label_bins": outside, "chance": float(majority),
            **_one_class(pred, gold, "class")}


def _generate(s: Subject, path: str, limit: int) -> dict:
    f = s.cfg.finetune
    pf, rf = (f.prompt_field, f.response_field) if f.kind == "sft" else ("prompt", "response")
    pairs = tasks.pairs("gen", _read(path, limit), pf, rf)
    prompts, stop = prompt_ids(s.cfg, s.sp, [p for p, _ in pairs])
    answers = s.scorer.greedy(s.params, prompts, f.max_new_tokens, stop)
    hyps = [s.sp.DecodeIds(a) for a in answers]
    refs = [r for _, r in pairs]
    return {"n": len(pairs), "bleu": metrics_text.bleu(refs, hyps), "rouge_l": metrics_text.rouge_l(refs, hyps),
            "tokenization": metrics_text.TOKENIZATION, "greedy_tokens": f.max_new_tokens}


def prompt_ids(cfg, sp, prompts: list[str]):
    """Prompt ids through the SFT template (up to the assistant's turn) and the ids that end an answer, the
    template's end marker first."""
    if cfg.finetune.kind not in config_finetune.TEMPLATED:
        return [[tok_lib.BOS, *x] for x in sp.Encode(prompts, out_type=int)], (tok_lib.EOS,)
    tmpl = finetune_data.Template(cfg.finetune.template, sp, "config key finetune.template")
    out = []
    for ids in sp.Encode(prompts, out_type=int):
        full, _, prefix = tmpl.encode({}, {"prompt": ids, "response": []}, loss_from="response")
        out.append(full[:prefix])
    return out, ((tmpl.special_ids[-1],) if tmpl.special_ids else ()) + (tok_lib.EOS,)


# What an encoder (model.arch=encoder) can be judged by: mean final states and its classifier; every other
# kind scores or generates the next token, which a bidirectional model does not predict.
ENCODER_KINDS = ("korsts", "cls")


def run_all(s: Subject, spec: str, fewshot_spec: str = "", shots: int = 0, limit: int = 0) -> dict:
    fewshot = {kind: path for _, kind, path in tasks.parse_specs(fewshot_spec, "fewshot")}
    if s.cfg.model.arch == "encoder":
        for _, kind, _ in tasks.parse_specs(spec):
            if kind not in ENCODER_KINDS:
                raise KslmError(f"task {kind} scores the next token, which an encoder (model.arch=encoder) does not "
                                "predict; an encoder takes korsts (mean states) and cls (fine-tune a classifier "
                                f"on the task's train set with finetune.kind=cls, then score its dev file)")
    if shots and not fewshot:
        raise KslmError(f"{shots} few-shot examples asked for but no --fewshot kind=path file to draw them from")
    out = {}
    for name, kind, path in tasks.parse_specs(spec):
        s.scorer.label = name
        out[name] = run_task(s, kind, path, fewshot.get(kind), shots, limit)
    return out


def write(workdir: Path, results: dict, step: int, tensorboard: bool) -> None:
    if not distributed.is_primary():
        return
    out = workdir_lib.paths(workdir)["eval"]
    for name, r in results.items():
        workdir_lib.atomic_write_text(out / f"{name}.json", json.dumps({"task": name, "step": step, **r}, indent=2,
                                                                       ensure_ascii=False) + "\n")
    writer = metrics.Writer(workdir, tensorboard)
    writer.scalars(step, flat(results))
    writer.close()


def flat(results: dict, prefix: str = "eval/") -> dict:
    return {f"{prefix}{name}/{k}": v for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "shots")}


def table(results: dict) -> str:
    """One row a task; `chance` is what guessing scores (uniform over the choices; for cls, the majority class)."""
    lines = [f"{'task':20s}{'n':>7s}  metrics"]
    for name, r in results.items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float) and k != "chance")
        if "chance" in r:
            shown += f"  (chance {r['chance']:.4f})"
        lines.append(f"{name:20s}{r.get('n', 0):>7d}  {shown}")
    notes = {r[k] for r in results.values() for k in ("tokenization", "method") if k in r}
    warnings = [f"warning: {name}: {r['warning']}" for name, r in results.items() if "warning" in r]
    return "\n".join(lines + [f"  ({n})" for n in sorted(notes)] + warnings)


def during_training(trainer, step: int) -> dict:
    """The configured tasks on the trainer's current weights; a flat {task/metric: value} for the loop."""
    cfg, o = trainer.cfg, trainer.objective
    params = o.lm_params(trainer.state)
    if getattr(trainer, "_task_subject", None) is None:
        trainer._task_subject = make_subject(cfg, trainer.model, params, tok_lib.check_workdir(cfg, trainer.workdir),
                                             word_ids=o.word_ids)
    s = trainer._task_subject
    s.params = params
    s.head = o.head(trainer.state)
    with jax.set_mesh(trainer.mesh):
        results = run_all(s, cfg.eval.tasks, cfg.eval.fewshot, cfg.eval.shots, cfg.eval.limit)
    if distributed.is_primary():
        out = workdir_lib.paths(trainer.workdir)["eval"]
        for name, r in results.items():
            workdir_lib.atomic_write_text(out / f"{name}.json", json.dumps({"task": name, "step": step, **r},
                                                                           indent=2, ensure_ascii=False) + "\n")
    return flat(results, prefix="")
