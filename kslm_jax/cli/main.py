"""`kslm <command>`: parse arguments, then call the library. Errors a user can cause print one line, exit 2."""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys

from kslm_jax.cli import commands
from kslm_jax.core import distributed
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError

COMMON = """
common options:
  --config FILE          a recipe such as configs/tiny_ko.py (default: the workdir's config.json)
  --config.S.K=VALUE     override one key, e.g. --config.model.n_layers=8 (values are literals, never code)
  --workdir DIR          the run's folder: config.json, data/, tokenizer/, checkpoints/, tensorboard/, eval/
  --force                let a changed config overwrite the workdir's config.json
"""

COMMANDS = {
    "prepare": ("Clean, filter and deduplicate raw text into train/val shards.",
                "reads:  data.sources (txt, jsonl, jsonl.gz; 'demo' = the bundled corpus)\n"
                "writes: WORKDIR/data/clean/{train,val}-NNNNN.jsonl and report.json"),
    "tokenizer": ("Train a SentencePiece tokenizer (BPE or unigram, byte fallback, optional Kiwi morpheme or\n"
                  "jamo pre-tokenization) and report its fertility; --report measures the existing one, trains "
                  "nothing.",
                  "reads:  WORKDIR/data/clean/train-*.jsonl (fertility on val-*.jsonl, or on --text FILES)\n"
                  "writes: WORKDIR/tokenizer/spm.model, spm.vocab, report.json (not with --text)"),
    "tokenize": ("Encode the clean shards into token-id ArrayRecord shards.",
                 "reads:  WORKDIR/data/clean, WORKDIR/tokenizer/spm.model\n"
                 "writes: WORKDIR/data/tokens/{train,val}-NNNNN.arrayrecord (+ .lengths.npy), manifest.json"),
    "train": ("Train (or resume) the model; SIGTERM/SIGINT save a checkpoint and exit 0.",
              "reads:  WORKDIR/data/tokens, WORKDIR/checkpoints (resumes from the newest)\n"
              "writes: WORKDIR/checkpoints/<step>/, tensorboard/, metrics.jsonl, eval/lm.json"),
    "eval": ("Held-out loss, perplexity and bits per character/byte, beside a unigram baseline; or --tasks.",
             "reads:  WORKDIR/checkpoints (newest), WORKDIR/data/tokens/val-*; --tasks: the task files\n"
             "writes: WORKDIR/eval/lm.json; --tasks: WORKDIR/eval/<task>.json and TensorBoard eval/<task>/*"),
    "generate": ("Sample text from the newest checkpoint (KV cache; temperature, top-k, top-p).",
                 "reads:  WORKDIR/checkpoints (newest), WORKDIR/tokenizer/spm.model\n"
                 "writes: nothing; prints the samples"),
    "export": ("Export the newest checkpoint: hf (Hugging Face LlamaForCausalLM), gguf (llama.cpp) or onnx.",
               "reads:  WORKDIR/config.json, checkpoints (newest), tokenizer/spm.model\n"
               "writes: --out; hf: a folder with config.json, model.safetensors, tokenizer.model, ...;\n"
               "        gguf: one file (default WORKDIR/export/model-<quant>.gguf);\n"
               "        onnx: a folder with model.onnx (+ model.onnx.data past 2 GB) and tokenizer.model"),
    "import": ("Import a local Hugging Face Llama directory (safetensors + tokenizer.model) as a new workdir.",
               "reads:  --hf DIR: config.json, model.safetensors (or sharded + index), tokenizer.model\n"
               "writes: WORKDIR/config.json, tokenizer/spm.model, checkpoints/0 (usable by train, eval, generate)"),
    "distill-cache": ("Write the teacher's top-k predictions for every training batch (offline distillation).",
                      "reads:  distill.teacher, WORKDIR/data/tokens (the same batches `kslm train` will see)\n"
                      "writes: WORKDIR/distill_cache (or distill.cache): ArrayRecord shards + manifest.json"),
    "prune": ("Make a smaller model from a trained one: drop layers, MLP channels, heads, embedding channels.",
              "reads:  --teacher WORKDIR (config, newest checkpoint, tokens for calibration)\n"
              "writes: WORKDIR/config.json, tokenizer/, data/tokens (hard links), prune.json, checkpoints/0"),
    "merge-lora": ("Fold a LoRA run's adapters into its base: a plain workdir for eval, generate and export.",
                   "reads:  WORKDIR (config, newest adapters), its finetune.init_from base\n"
                   "writes: --out: config.json, tokenizer/, checkpoints/0, merged_from.json"),
    "config": ("Show every config key with its value and what it does (nothing is written).",
               "reads:  --config FILE (+ --config.S.K=V), else WORKDIR/config.json, else the defaults\n"
               "writes: nothing; prints `section.key = value  # help` for every key"),
    "compile": ("Compile the train step for a Cloud TPU topology on this machine (no TPU needed): memory per chip,\n"
                "fit, FLOPs, collectives and a roofline estimate; exit 2 with the lever when it does not fit.",
                "reads:  --config (or WORKDIR/config.json), --topology v5e-16 | v5litepod-16 | v4-32 | v5p-128 | v6e-64\n"
                "writes: WORKDIR/compile.json (when --workdir is given); needs the `tpu` extra (libtpu)"),
    "inspect": ("Show the parameters (shape, dtype, count per module), each one's PartitionSpec and bytes per device\n"
                "on the configured mesh, per-device totals of parameters, optimizer state and gradients, and the\n"
                "compiled train step's memory and FLOPs on this machine's devices (nothing is allocated).",
                "reads:  WORKDIR/config.json (or --config, + --config.S.K=V such as --config.mesh.fsdp=4)\n"
                "writes: nothing; prints the report"),
    "serve": ("Serve the newest checkpoint over HTTP, OpenAI-compatible: /v1/models, /v1/completions, "
              "/v1/chat/completions.",
              "reads:  llamacpp: WORKDIR/export/model-<quant>.gguf (exported first when missing or stale);\n"
              "        jax: WORKDIR/checkpoints (newest), tokenizer/spm.model\n"
              "writes: llamacpp: that GGUF file when it exports it; nothing else"),
    "sweep": ("Search hyperparameters with Optuna: each trial is a `kslm train` run, pruned by Hyperband on eval "
              "bits/char.",
              "reads:  WORKDIR/data/tokens, tokenizer/ (prepared once; shared by every trial)\n"
              "writes: WORKDIR/sweep.db (or --storage), trials/NNN/ (ordinary workdirs), best.json, importance.png,\n"
              "        tensorboard_sweep/ (HParams); with --transfer also transfer/"),
    "demo": ("Run every stage on the bundled Korean corpus: prepare, tokenizer, tokenize, train, eval, generate.",
             "reads:  the constitution and bill texts inside the KoNLPy wheel (configs/tiny_ko.py)\n"
             "writes: everything above under WORKDIR (default runs/demo)"),
}


def _parser(command: str) -> argparse.ArgumentParser:
    summary, io = COMMANDS[command]
    p = argparse.ArgumentParser(prog=f"kslm {command}", description=f"{summary}\n\n{io}", epilog=COMMON,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="recipe file (a Python file with get_config())")
    p.add_argument("--workdir", required=command not in ("demo", "config", "compile"),
                   default="runs/demo" if command == "demo" else None,
                   help="the run's folder")
    p.add_argument("--force", action="store_true", help="overwrite a differing config.json in the workdir")
    if command == "tokenizer":
        p.add_argument("--report", action="store_true",
                       help="measure the workdir's trained tokenizer (no training): tokens per character, eojeol "
                            "and byte, byte-fallback rate, vocabulary used")
        p.add_argument("--text", default=None, metavar="FILES",
                       help="measure on these files or globs (read and cleaned like data.sources) instead of the "
                            "held-out split")
    if command == "compile":
        p.add_argument("--topology", required=True, help="a Cloud TPU accelerator type, e.g. v5e-16 or v5p-128")
        p.add_argument("--slices", type=int, default=1, help="slices joined over the data-center network")
    if command == "train":
        p.add_argument("--profile", default=None, metavar="START:STOP",
                       help="trace steps START..STOP with jax.profiler into WORKDIR/tensorboard (TensorBoard's "
                            "Profile tab); the same as --config.logging.profile_steps=START:STOP")
    if command == "generate":
        p.add_argument("--prompt", action="append", default=[],
                       help="a prompt (repeatable; default: openings of held-out documents)")
        p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to sample (generate.max_new_tokens)")
        p.add_argument("--temperature", type=float, default=None, help="0: greedy (generate.temperature)")
        p.add_argument("--top-p", type=float, default=None, help="nucleus mass (generate.top_p)")
        p.add_argument("--num-samples", type=int, default=None,
                       help="samples per prompt (default 1)")
        p.add_argument("--seed", type=int, default=None, help="sampling seed (generate.seed)")
    if command == "config":
        p.add_argument("--show", action="store_true", help="print every key, its value and its help (the default)")
    if command in ("eval", "generate"):
        p.add_argument("--quant", action="append", choices=["int8", "int4"], default=[],
                       help="also run with weight-only int8/int4 weights (repeatable)")
    if command == "export":
        p.add_argument("--format", choices=["hf", "gguf", "onnx"], default="hf", help="target format")
        p.add_argument("--quant", choices=["f16", "q8_0", "q4_0"], default=None,
                       help="gguf tensor type (default f16); hf and onnx are float32 only")
        p.add_argument("--out", default=None, help="output folder (default WORKDIR/export/<format>)")
    if command == "import":
        p.add_argument("--hf", required=True, help="a local Hugging Face Llama model folder")
    if command == "eval":
        p.add_argument("--tasks", default=None,
                       help="benchmark tasks 'kind=path,...' (kinds: README, Evaluation tasks); default eval.tasks")
        p.add_argument("--fewshot", default=None, help="'kind=path,...': the split few-shot examples come from")
        p.add_argument("--shots", type=int, default=None, help="few-shot examples per question (default eval.shots)")
        p.add_argument("--limit", type=int, default=None, help="records per task (default eval.limit; 0: all)")
    if command == "serve":
        p.add_argument("--backend", choices=["llamacpp", "jax"], default="llamacpp",
                       help="llamacpp: llama-cpp-python's server over the GGUF export; jax: our decoder, batched")
        p.add_argument("--quant", choices=["f16", "q8_0", "q4_0"], default="f16", help="llamacpp: GGUF tensor type")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
        p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
        p.add_argument("--n-ctx", type=int, default=2048, help="context window: prompt + completion tokens")
        p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (413 past it)")
        p.add_argument("--max-batch", type=int, default=8, help="jax: requests decoded together in one step")
        p.add_argument("--max-queue", type=int, default=64, help="jax: requests waiting; more get 429")
        p.add_argument("--threads", type=int, default=0, help="llamacpp: CPU threads (default: every core)")
    if command == "merge-lora":
        p.add_argument("--out", required=True, help="the new workdir for the merged model")
    if command == "distill-cache":
        p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                       help="storage of the top-k log-probabilities (ids are int32)")
    if command == "prune":
        p.add_argument("--teacher", required=True, help="the trained workdir to prune")
        p.add_argument("--keep-layers", default=None, help="layers to keep, e.g. 0,2,4")
        p.add_argument("--n-layers", type=int, default=None, help="layers to keep, chosen by --drop-layers-by")
        p.add_argument("--drop-layers-by", choices=["importance", "every_other"], default="importance",
                       help="importance: keep the highest block influence (1 - cos(h_in, h_out)); every_other: "
                            "evenly spaced from the first")
        p.add_argument("--d-model", type=int, default=None, help="embedding channels to keep")
        p.add_argument("--d-ff", type=int, default=None, help="MLP channels to keep per layer")
        p.add_argument("--n-heads", type=int, default=None, help="query heads to keep per layer")
        p.add_argument("--n-kv-heads", type=int, default=None, help="KV heads (groups) to keep per layer")
        p.add_argument("--calib-batches", type=int, default=8, help="training batches that measure importance")
    if command == "sweep":
        p.add_argument("--space", action="append", default=[], metavar="KEY=KIND(ARGS)",
                       help="a swept key: loguniform(a,b), uniform(a,b), int(a,b) or choice(v1,v2,...) (repeatable)")
        p.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials wanted in all")
        p.add_argument("--budget-steps", type=int, default=None, help="train.steps of each trial (default: config)")
        p.add_argument("--parallel", type=int, default=1,
                       help="trials at once in this process: CPU processes, or one GPU each (CUDA_VISIBLE_DEVICES)")
        p.add_argument("--storage", default=None,
                       help="SQLAlchemy URL shared by several processes or hosts (default sqlite:///WORKDIR/sweep.db)")
        p.add_argument("--study", default="kslm-sweep", help="study name inside the storage")
        p.add_argument("--sampler", choices=["tpe", "qmc", "random"], default="tpe",
                       help="tpe (default); qmc spreads few trials evenly over the space")
        p.add_argument("--pruner", choices=["hyperband", "none"], default="hyperband",
                       help="hyperband: stop trials that trail at an eval (successive halving); none: run all out")
        p.add_argument("--seed", type=int, default=None, help="sampler seed")
        p.add_argument("--heartbeat", type=int, default=10,
                       help="seconds between a running trial's heartbeats; one silent for 3 is re-run")
        p.add_argument("--transfer", default=None, metavar="KEY=VALUE",
                       help="after the sweep, train with KEY=VALUE (e.g. model.d_model=512) and the best values")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            item = a[len("--config."):]
            if "=" not in item:
                item = f"{item}={next(it, '')}"
            overrides.append(item)
        else:
            rest.append(a)
    return rest, overrides


def _setup_logging():
    # Our own logger gets its own handler: importing jax and orbax may already have configured the root one.
    ours = logging.getLogger("kslm")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kslm: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    sys.unraisablehook = _quiet_closed_loop
    # Their failures reach us as exceptions, which we report in one line; their own tracebacks are noise.
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _quiet_closed_loop(info) -> None:
    """Tensorstore's reader threads still post their results to orbax's event loop after a failed read (a
    damaged step, a full disk) has closed it; each post prints an "Event loop is closed" traceback that
    says nothing the one line about the failure does not."""
    if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
        return
    sys.__unraisablehook__(info)


def _fail(message: str, code: int = 2) -> None:
    """One line, exit code 2 (or the error's own: 4 for out of memory). os._exit: after a failed asynchronous
    save, orbax's writer threads would otherwise print their own tracebacks while the interpreter shuts down."""
    print(f"kslm: error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    _exit_now(code)


def _exit_now(code: int) -> None:
    # Apart from _fail so that tests can run main() in their own process and get SystemExit instead: closing
    # fd 2 and os._exit there would end the test run.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # nothing a dying library thread prints can follow our line
    os._exit(code)


# Commands that may start a workdir that does not exist yet; every other one refuses a missing --workdir.
CREATES = ("prepare", "import", "demo", "prune")
READS_ONLY = ("eval", "generate", "export", "compile", "config", "inspect")


def _workdir_locks(command: str, args, stack: contextlib.ExitStack) -> None:
    """Check that the folders the command reads exist, then lock each folder it touches (process 0 only:
    on a pod every process runs the same command on the same workdir)."""
    if getattr(args, "workdir", None) is None:  # `kslm config`, `kslm compile` without a workdir
        return
    # sweep: a shared lock, so several sweep processes run one study while `kslm train` there is refused
    exclusive = command not in READS_ONLY + ("sweep",) and not getattr(args, "text", None)
    plan = [(args.workdir, exclusive, command in CREATES)]
    if command == "prune":
        plan.append((args.teacher, False, False))
    if command == "merge-lora":
        plan = [(args.workdir, False, False), (args.out, True, True)]
    for path, _, may_create in plan:
        if not may_create:
            workdir_lib.require_existing(path, command)
    if distributed.requested():
        distributed.initialize_from_env()
    if not distributed.is_primary():
        return
    for path, exclusive, _ in plan:
        stack.enter_context(workdir_lib.lock(path, exclusive, command))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
        print("usage: kslm <command> [--config FILE] [--config.S.K=V ...] --workdir DIR\n\ncommands:\n"
              + "\n".join(lines) + "\n\n`kslm <command> --help` says what each reads and writes.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"kslm: error: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    command = argv[0]
    rest, overrides = _split_overrides(argv[1:])
    args = _parser(command).parse_args(rest)
    _setup_logging()
    try:
        with contextlib.ExitStack() as stack:
            _workdir_locks(command, args, stack)
            # `import`, `eval` and `compile` are Python names; their functions carry a trailing underscore.
            name = command.replace("-", "_")
            code = getattr(commands, name + "_" if command in ("import", "eval", "compile") else name)(args, overrides)
    except KslmError as e:
        _fail(str(e), getattr(e, "exit_code", 2))
    except Exception as e:  # noqa: BLE001 - only a full disk is translated; everything else re-raises
        if "Corrupted Riegeli/records file" in str(e):  # a token shard damaged past what verify_shards=false checks
            _fail(f"a token shard is damaged ({str(e).splitlines()[0][:160]}); run with "
                  "--config.data.verify_shards=true to name it, then `kslm tokenize` again")
        if not workdir_lib.disk_full(e):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"disk full while writing{where}: free space and run the command again; "
              "outputs written before this command are intact")
    sys.exit(code or 0)


def run() -> None:
    """The `kslm` script and `python -m kslm_jax`: main() in a process of its own."""
    try:
        main()
    finally:
        # On its way out the interpreter runs one last full garbage collection over every object still alive, and
        # JAX, Flax and orbax leave hundreds of thousands. That pass skips frozen objects (reference counting still
        # frees them): a 4-step `kslm train` on 2 busy CPU cores took 0.9-1.3 s from main's return to its exit,
        # 0.15 s frozen, and 0.4-0.6 s less CPU. Not in main(): a test process that calls main() keeps its collector.
        gc.freeze()


if __name__ == "__main__":
    run()
