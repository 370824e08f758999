"""`kslm serve`: an OpenAI-compatible endpoint (/v1/models, /v1/completions, /v1/chat/completions) for a workdir.

llamacpp (the default) is llama-cpp-python's own server over the workdir's GGUF export, written first when it is
missing or older than the newest checkpoint; jax is our KV-cache decoder with batched steps (cli/serve_jax.py).
Both sit behind the same guard (cli/serve_http.py), so they refuse bad requests alike. Both bind 127.0.0.1
unless --host says otherwise.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax

from kslm_jax.cli import eval_cmd, serve_http, serve_jax
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import chat
from kslm_jax.eval import runner
from kslm_jax.export import gguf_io
from kslm_jax.model import arch
from kslm_jax.objectives import finetune_io

log = logging.getLogger("kslm")


@dataclasses.dataclass
class Options:
    backend: str = "llamacpp"
    quant: str = "f16"
    n_ctx: int = 2048
    api_key: str | None = None
    max_body: int = 1 << 20
    max_batch: int = 8
    max_queue: int = 64
    threads: int = 0          # llama.cpp threads; 0: every core
    model_name: str | None = None


def _need_extras(backend: str):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        if backend == "llamacpp":
            import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        extra = "serve,llamacpp" if backend == "llamacpp" else "serve"
        raise KslmError(f"kslm serve --backend {backend} needs {e.name}: pip install 'kslm_jax[{extra}]'") from None


def gguf_for(cfg, workdir: Path, quant: str) -> Path:
    """The workdir's GGUF export at the default path, exported now when missing or older than the checkpoint."""
    step = finetune_io.newest_step(workdir)
    if step is None:
        raise KslmError(f"no checkpoint in {workdir_lib.paths(workdir)['checkpoints']}; train first")
    path = workdir / "export" / f"model-{quant}.gguf"
    newest = workdir_lib.paths(workdir)["checkpoints"] / str(step)
    if not path.exists() or path.stat().st_mtime < newest.stat().st_mtime:
        log.info("exporting checkpoint %d to %s", step, path)
        gguf_io.export_gguf(workdir, path, quant)
    return path


def build_app(cfg, workdir: Path, opts: Options):
    """The ASGI app of the chosen backend behind the guard, and a function that stops its worker."""
    _need_extras(opts.backend)
    name = opts.model_name or workdir.resolve().name
    if opts.backend == "llamacpp":
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
        path = gguf_for(cfg, workdir, opts.quant)
        model = ModelSettings(model=str(path), model_alias=name, n_ctx=opts.n_ctx, n_batch=min(512, opts.n_ctx),
                              n_threads=opts.threads or os.cpu_count(), n_threads_batch=opts.threads or os.cpu_count(),
                              verbose=False)
        # The API key is checked by our guard, which answers in OpenAI's error shape.
        app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=0), model_settings=[model])
        # llama-cpp-python's own defaults (repeat penalty 1.1, top-k 40, min-p 0.05) are no OpenAI parameters;
        # without them its sampling is OpenAI's (temperature, top_p) and the jax backend's.
        plain = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
        return serve_http.Guard(app, name, opts.api_key, opts.max_body, plain), (lambda: None)
    if opts.backend != "jax":
        raise KslmError(f"--backend {opts.backend!r} is not one of llamacpp, jax")
    subject, step = eval_cmd.load(cfg, workdir)
    _, stop_ids = runner.prompt_ids(cfg, subject.sp, [""])
    log.info("serving checkpoint %d of %s on %s", step, workdir, jax.devices()[0].platform)
    engine = serve_jax.Engine(subject.model, subject.params, subject.sp, stop_ids, opts.n_ctx, opts.max_batch,
                              opts.max_queue)
    app = serve_jax.make_app(engine, name, chat.chat_template(cfg))
    return serve_http.Guard(app, name, opts.api_key, opts.max_body), engine.close


def cli(args, overrides) -> int:
    cfg = workdir_lib.config_for(args.workdir, args.config, overrides, getattr(args, "force", False))
    arch.require_decoder(cfg, "kslm serve")
    if args.port < 0 or args.port > 65535:
        raise KslmError(f"--port {args.port} is not a TCP port (0-65535)")
    opts = Options(backend=args.backend, quant=args.quant, n_ctx=args.n_ctx, api_key=args.api_key,
                   max_body=args.max_body, max_batch=args.max_batch, max_queue=args.max_queue,
                   threads=args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and opts.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    app, stop = build_app(cfg, Path(args.workdir), opts)
    try:
        serve_http.run(app, args.host, args.port)
    finally:
        stop()
    return 0
