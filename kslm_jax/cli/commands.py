"""One function per `kslm` command; each also works from Python (tests, notebooks): f(args, overrides) -> exit code."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from kslm_jax.cli import compile as compile_cmd
from kslm_jax.cli import eval_cmd, export_cmd, inspect_cmd
from kslm_jax.cli import serve as serve_cmd
from kslm_jax.cli.sweep import cli as sweep  # noqa: F401 - `kslm sweep`: trials run `kslm train` in subprocesses
from kslm_jax.compress import prune as prune_lib
from kslm_jax.core import checkpoint, config_help, distributed, metrics
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.config import resolve_recipe
from kslm_jax.core.errors import KslmError
from kslm_jax.data import clean, shards, sources
from kslm_jax.data import prepare as prepare_lib
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import generate as gen
from kslm_jax.eval import lm as evaluate
from kslm_jax.eval import train_report
from kslm_jax.model import arch, quantize
from kslm_jax.objectives import distill_cache as cache_lib
from kslm_jax.objectives import dpo, finetune, finetune_io, lm, mlm, student
from kslm_jax.train import hf_import

log = logging.getLogger("kslm")

DEMO_PROMPTS = ("대한민국의 주권은", "국회는", "이 법은")


def _cfg(args, overrides):
    return workdir_lib.config_for(args.workdir, args.config, overrides, getattr(args, "force", False))


def prepare(args, overrides) -> int:
    cfg = _cfg(args, overrides)
    report = prepare_lib.prepare(cfg, workdir_lib.paths(args.workdir)["clean"])
    print(prepare_lib.format_report(report))
    return 0


def tokenizer(args, overrides) -> int:
    cfg = _cfg(args, overrides)
    p = workdir_lib.paths(args.workdir)
    if getattr(args, "report", False):  # measure the tokenizer the workdir has; train nothing
        sp = tok_lib.load(p["tokenizer"])
    else:
        sp = tok_lib.train(prepare_lib.read_clean(p["clean"], "train"), p["tokenizer"], cfg.tokenizer, cfg.data.seed)
        print(f"tokenizer: {sp.GetPieceSize()} pieces ({cfg.tokenizer.model_type}, pretokenize "
              f"{cfg.tokenizer.pretokenize}) -> {p['tokenizer']}")
    if getattr(args, "text", None):
        where, texts = args.text, _cleaned_texts(cfg, args.text)
    elif list(p["clean"].glob("val-*")):
        where, texts = "the held-out split (data/clean/val-*)", prepare_lib.read_clean(p["clean"], "val")
    else:
        print("no held-out split to measure (data.val_fraction=0); pass --text FILE to --report on other text")
        return 0
    report = tok_lib.fertility(sp, texts)
    if not report:
        print(f"{where}: no text to measure")
        return 0
    report = dict(model_type=tok_lib.model_type(sp), pretokenize=tok_lib.pretokenize(sp),
                  pieces=sp.GetPieceSize(), measured_on=where, **report)
    if not getattr(args, "text", None):
        workdir_lib.atomic_write_text(p["tokenizer"].parent / "report.json", json.dumps(report, indent=2) + "\n")
    print(tok_lib.format_report(report))
    return 0


def _cleaned_texts(cfg, spec: str):
    """Documents of `spec` (files or globs, read like data.sources) through the same cleaning as prepare."""
    import collections

    files = sources.expand(spec)
    stats: collections.Counter = collections.Counter()
    settings = clean.CleanSettings.from_config(cfg.data)
    for doc in sources.read_all(files, cfg.data.text_mode, cfg.data.text_field, stats):
        text = clean.clean_text(doc.text, settings, stats)
        if text:
            yield text


def tokenize(args, overrides) -> int:
    cfg = _cfg(args, overrides)
    p = workdir_lib.paths(args.workdir)
    tok_lib.check_workdir(cfg, Path(args.workdir))
    manifest = shards.tokenize(p["clean"], p["tokenizer"], p["tokens"], cfg.data.tokenize_workers)
    for split in ("train", "val"):
        m = manifest[split]
        print(f"{split}: {m['docs']:,} documents, {m['tokens']:,} tokens, {m['chars']:,} characters")
    return 0


def _print_eval(step, result, seconds):
    print(f"eval at step {step}: loss {result['loss']:.4f}  ppl {result['perplexity']:.2f}  "
          f"bits/char {result['bits_per_char']:.3f}  ({seconds:.1f}s)")


def train(args, overrides) -> int:
    distributed.initialize_from_env()
    if getattr(args, "profile", None):
        overrides = [*overrides, f"logging.profile_steps={args.profile}"]
    cfg = _cfg(args, overrides)
    if cfg.finetune.kind == "dpo":  # preference pairs against a frozen reference, from finetune.init_from
        return dpo.train(cfg, args.workdir)
    if cfg.finetune.kind != "none":  # SFT or classification: examples from files, base from finetune.init_from
        return finetune.train(cfg, args.workdir)
    tok_lib.check_workdir(cfg, Path(args.workdir))
    if cfg.model.arch == "encoder":  # masked LM: no next-token baseline or samples to report
        return mlm.train(cfg, args.workdir)
    # Distillation changes the objective and adds the teacher; the loop is the same.
    trainer = (student.trainer if student.enabled(cfg) else lm.trainer)(cfg, args.workdir)
    report = train_report.TrainReport(cfg, args.workdir, trainer, on_eval=_print_eval)
    try:
        report.measure_before()
        summary = trainer.fit(on_eval=report.on_eval)
        if summary.get("eval"):
            _write_eval(args.workdir, {"model": summary["eval"], "unigram": report.unigram, "before": report.before,
                                       "step": summary["step"]})
            print("\n" + report.finish(summary))
    finally:
        report.close()
    return 0


def _write_eval(workdir, result: dict) -> None:
    if not distributed.is_primary():
        return
    path = workdir_lib.paths(workdir)["eval"] / "lm.json"
    workdir_lib.atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def _restored_trainer(cfg, workdir):
    trainer = (mlm.trainer if cfg.model.arch == "encoder" else lm.trainer)(cfg, workdir)
    import jax
    with jax.set_mesh(trainer.mesh):
        step, trainer.state = checkpoint.restore_params(trainer.paths["checkpoints"], trainer.abstract)
    return trainer, step


def eval_(args, overrides) -> int:
    distributed.initialize_from_env()
    cfg = _cfg(args, overrides)
    if getattr(args, "tasks", None) or cfg.finetune.kind != "none":
        return eval_cmd.cli(args, overrides)
    if getattr(args, "quant", []):  # refused before a model is built
        arch.require_decoder(cfg, "kslm eval --quant")
    trainer, step = _restored_trainer(cfg, args.workdir)
    if cfg.model.arch == "encoder":  # masked-LM loss and accuracy on the held-out split, not next-token ones
        result = trainer.evaluate()
        print(mlm.format_eval(step, result))
        mlm.write_eval(args.workdir, step, result)
        return 0
    model_row = f"model (step {step})"
    rows = {model_row: trainer.evaluate()}
    full = trainer.state
    for mode in getattr(args, "quant", []):
        params, size = _quantized(trainer, mode)
        trainer.state = full.replace(params=params)
        rows[f"model {mode} ({size['bytes'] / 2**20:.2f} MiB)"] = trainer.evaluate()
        trainer.state = full
    rows["unigram (train split)"] = evaluate.unigram_baseline(trainer.paths["tokens"], cfg.tokenizer.vocab_size)
    print(evaluate.format_table(rows))
    board = metrics.Board(args.workdir, "eval", cfg.logging.tensorboard)  # beside training's eval/* curves
    board.scalars(step, {f"eval/{k}": v for k, v in rows[model_row].items() if k != "tokens"})
    board.scalars(step, {f"eval/unigram_{k}": v for k, v in rows["unigram (train split)"].items() if k != "tokens"})
    board.close()
    _write_eval(args.workdir, {"model": rows[model_row], "unigram": rows["unigram (train split)"], "step": step,
                               **{k: v for k, v in rows.items() if k.startswith("model int")}})
    return 0


def _quantized(trainer, mode):
    """The trainer's parameters as weight-only int8/int4 would compute them, and their stored size."""
    import jax
    import numpy as np
    arch.require_decoder(trainer.cfg, f"--quant {mode}")
    q, size = quantize.quantize_params(jax.tree.map(np.asarray, trainer.state.params), trainer.model_cfg, mode)
    return jax.device_put(q, trainer.shardings.params), size


def generate(args, overrides) -> int:
    import jax
    cfg = _cfg(args, overrides)
    flags = dict(max_new_tokens=getattr(args, "max_new_tokens", None), temperature=getattr(args, "temperature", None),
                 top_p=getattr(args, "top_p", None), seed=getattr(args, "seed", None))
    arch.require_causal(cfg, "kslm generate")
    gen.apply_sampling_flags(cfg.generate, **flags)  # validated before any model is built
    samples = getattr(args, "num_samples", None) or 1
    if samples < 1:
        raise KslmError(f"--num-samples must be 1 or more, not {samples}")
    if cfg.finetune.kind != "none":  # a fine-tuned decoder, prompted through its template
        extra = [f"generate.{k}={v}" for k, v in flags.items() if v is not None]
        return eval_cmd.generate_cli(args, list(overrides) + extra)
    prompts = args.prompt or gen.held_out_prompts(workdir_lib.paths(args.workdir)["clean"], 3)
    trainer, _ = _restored_trainer(cfg, args.workdir)
    if getattr(args, "quant", []):
        trainer.state = trainer.state.replace(params=_quantized(trainer, args.quant[-1])[0])
    sp = tok_lib.check_workdir(cfg, Path(args.workdir))
    rng = jax.random.PRNGKey(cfg.generate.seed)
    for prompt in prompts:
        for i in range(samples):
            rng, key = jax.random.split(rng)
            text = gen.generate_text(trainer.model, trainer.state.params, sp, prompt, cfg.generate, key)
            print(f"[{i + 1}] {text}" if samples > 1 else text)
    return 0


def export(args, overrides) -> int:
    return export_cmd.run(args, overrides)


def import_(args, overrides) -> int:
    hf_import.import_hf(Path(args.hf), Path(args.workdir), getattr(args, "force", False), overrides)
    print(f"imported {args.hf} -> {args.workdir} (checkpoint step 0)")
    return 0


def compile_(args, overrides) -> int:
    return compile_cmd.run(args, overrides)


def inspect(args, overrides) -> int:
    return inspect_cmd.run(args, overrides)


def demo(args, overrides) -> int:
    """Every stage on the bundled corpus, printing held-out bits per character before and after training."""
    import jax
    t0 = time.perf_counter()
    args = SimpleNamespace(workdir=args.workdir, config=args.config or str(resolve_recipe("tiny_ko")),
                           force=args.force)
    stages = (("prepare", prepare), ("tokenizer", tokenizer), ("tokenize", tokenize))
    for name, fn in stages:
        print(f"\n== {name}")
        fn(args, overrides)
    cfg = workdir_lib.config_for(args.workdir, None, [])
    arch.require_causal(cfg, "kslm demo")
    print(f"\n== train ({cfg.train.steps} steps on {jax.device_count()} {jax.devices()[0].platform} device(s))")
    trainer = lm.trainer(cfg, args.workdir)
    before = None
    if not trainer.has_checkpoint():
        trainer.init_fresh()
        before = trainer.evaluate()
    summary = trainer.fit(on_eval=_print_eval)
    after = summary.get("eval") or trainer.evaluate()
    unigram = evaluate.unigram_baseline(trainer.paths["tokens"], cfg.tokenizer.vocab_size)
    rows = {}
    if before is not None:
        rows["before training"] = before
    rows[f"after training (step {summary['step']})"] = after
    rows["unigram (train split)"] = unigram
    print("\n== held-out evaluation")
    print(evaluate.format_table(rows))
    _write_eval(args.workdir, {"model": after, "unigram": unigram, "before": before, "step": summary["step"]})
    verdict = "beats" if after["bits_per_char"] < unigram["bits_per_char"] else "does NOT beat"
    print(f"the trained model {verdict} the unigram model: {after['bits_per_char']:.3f} vs "
          f"{unigram['bits_per_char']:.3f} bits per character")
    print("\n== generate")
    sp = tok_lib.check_workdir(cfg, Path(args.workdir))
    rng = jax.random.PRNGKey(cfg.generate.seed)
    for prompt in DEMO_PROMPTS:
        rng, key = jax.random.split(rng)
        print(" ", gen.generate_text(trainer.model, trainer.state.params, sp, prompt, cfg.generate, key))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; TensorBoard: "
          f"tensorboard --logdir {Path(args.workdir) / 'tensorboard'} --host 127.0.0.1")
    return 0 if after["bits_per_char"] < unigram["bits_per_char"] else 1


def config(args, overrides) -> int:
    """Print the config a command would use here, key by key with its help; nothing is written."""
    wd = Path(args.workdir) if args.workdir else None
    if args.config is None and wd is not None and (wd / "config.json").is_file():
        cfg = config_lib.read_workdir_config(wd)
        for item in overrides:
            config_lib.apply_override(cfg, item)
        config_lib.validate(cfg)
        origin = f"{wd / 'config.json'}"
    else:
        if args.config is None and wd is not None and not wd.is_dir():
            raise KslmError(f"workdir {wd} does not exist; pass --config FILE, or a workdir made by kslm")
        cfg = config_lib.load(args.config, overrides)
        origin = str(resolve_recipe(args.config)) if args.config else "the defaults (base_config)"
    print(f"# config from {origin}" + (f" with {len(overrides)} override(s)" if overrides else ""))
    print(config_help.format_config(config_lib.flat(config_lib.to_dict(cfg))))
    return 0


def distill_cache(args, overrides) -> int:
    cfg = _cfg(args, overrides)
    out = cache_lib.write(cfg, Path(args.workdir), args.dtype)
    rel = out.relative_to(Path(args.workdir)) if out.is_relative_to(Path(args.workdir)) else out
    print(f"distill-cache: teacher top-{cfg.distill.topk} ({args.dtype}) for {cfg.train.steps} batches -> {out}\n"
          f"train from it with: kslm train --workdir {args.workdir} --config.distill.cache={rel}")
    return 0


def prune(args, overrides) -> int:
    if args.config:
        raise KslmError("prune takes the teacher's config; change the output's keys with --config.S.K=V overrides")
    keep = None
    if args.keep_layers:
        try:
            keep = [int(x) for x in args.keep_layers.split(",") if x.strip()]
        except ValueError:
            raise KslmError(f"--keep-layers {args.keep_layers!r}: give layer numbers such as 0,2,4") from None
    if keep and args.n_layers:
        raise KslmError("give either --keep-layers or --n-layers (with --drop-layers-by), not both")
    report = prune_lib.prune(Path(args.teacher), Path(args.workdir), keep_layers=keep, n_layers=args.n_layers,
                             by=args.drop_layers_by, d_model=args.d_model, d_ff=args.d_ff, n_heads=args.n_heads,
                             n_kv_heads=args.n_kv_heads, calib_batches=args.calib_batches, overrides=overrides,
                             force=args.force)
    s, p = report["shape"], report["params"]
    print(f"pruned {args.teacher} ({p['teacher'] / 1e6:.1f}M) -> {args.workdir} ({p['student'] / 1e6:.1f}M): "
          f"layers {report['kept']['layers']}, d_model {s['d_model']}, heads {s['n_heads']}/{s['n_kv_heads']}, "
          f"d_ff {s['d_ff']}; checkpoint step 0")
    return 0


def merge_lora(args, overrides) -> int:
    if overrides or args.config:
        raise KslmError("merge-lora takes no --config: it merges the run as configured in its workdir")
    info = finetune_io.merge_lora(Path(args.workdir), Path(args.out), args.force)
    print(f"merged LoRA adapters of {args.workdir} (rank {info['rank']}, step {info['step']}) into "
          f"{info['base']} -> {args.out} (a plain workdir at step 0: kslm eval/generate/export read it)")
    return 0


def serve(args, overrides) -> int:
    return serve_cmd.cli(args, overrides)
