"""`kslm eval --tasks`, a fine-tuning run's `kslm eval`, and a fine-tuned `kslm generate`: each loads the newest
checkpoint of a workdir (plain, fine-tuned or LoRA) and hands the weights to the task harness (eval/runner.py).
"""
from __future__ import annotations

from pathlib import Path

import jax

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import finetune_data
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import generate as gen
from kslm_jax.eval import runner
from kslm_jax.model import arch, classify
from kslm_jax.objectives import dpo, finetune, finetune_io


def load(cfg, workdir: Path) -> tuple[runner.Subject, int]:
    """The newest checkpoint of any workdir (plain, fine-tuned, LoRA) as a Subject on the default device."""
    sp = tok_lib.check_workdir(cfg, workdir)
    step = finetune_io.newest_step(workdir)
    if step is None:
        raise KslmError(f"no checkpoint in {workdir_lib.paths(workdir)['checkpoints']}; train first")
    copy = config_lib.from_dict(config_lib.to_dict(cfg))
    decoder, head = finetune_io.lm_params_host(copy, workdir, with_head=True) if cfg.finetune.kind != "none" else (
        None, None)
    if decoder is None:
        decoder = finetune_io.restore_params_host(copy, workdir)
    word_ids = None
    if cfg.finetune.kind == "cls" and cfg.finetune.head == "label_words":
        word_ids = classify.label_word_ids(sp, cfg.finetune.label_words, len(finetune_data.class_names(cfg)))
    model = arch.from_config(cfg)[1]
    return runner.make_subject(cfg, model, jax.device_put(decoder), sp, jax.device_put(head), word_ids), step


def cli(args, overrides) -> int:
    cfg = workdir_lib.config_for(args.workdir, args.config, overrides, getattr(args, "force", False))
    workdir = Path(args.workdir)
    spec = args.tasks or cfg.eval.tasks
    if not spec:
        return finetune.evaluate_workdir(cfg, workdir, dpo.trainer if cfg.finetune.kind == "dpo" else finetune.trainer)
    shots = cfg.eval.shots if args.shots is None else args.shots
    limit = cfg.eval.limit if args.limit is None else args.limit
    s, step = load(cfg, workdir)
    results = runner.run_all(s, spec, args.fewshot or cfg.eval.fewshot, shots, limit)
    runner.write(workdir, results, step, cfg.logging.tensorboard)
    print(f"checkpoint step {step}")
    print(runner.table(results))
    return 0


def generate_cli(args, overrides) -> int:
    cfg = workdir_lib.config_for(args.workdir, args.config, overrides, getattr(args, "force", False))
    s, _ = load(cfg, Path(args.workdir))
    prompts = args.prompt or ["안녕하세요"]
    ids, stop = runner.prompt_ids(cfg, s.sp, prompts)
    rng = jax.random.PRNGKey(cfg.generate.seed)
    g = cfg.generate
    for prompt, p in zip(prompts, ids):
        rng, key = jax.random.split(rng)
        out = gen.generate_ids(s.model, s.params, p, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                               top_k=g.top_k, top_p=g.top_p, rng=key, vocab_limit=s.sp.GetPieceSize(),
                               stop_id=stop[0])
        print(f"{prompt} → {s.sp.DecodeIds(out)}")
    return 0
