"""`kslm serve` under load: p50/p95 latency, time to first token and tokens/s at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py --workdir runs/demo [--backends jax,llamacpp] [--max-tokens 8] [--threads 2]

The served model has the ko_125m shape (configs/ko_125m.py: d_model 768, 12 layers, 12 heads, d_ff 2048, a 32k
logits width) with random weights (speed does not depend on their values), float32 for JAX and F16 GGUF for
llama.cpp, and the tokenizer of --workdir (its pieces fill the first rows of the 32k vocabulary). Each client
streams one completion of a --prompt-words prompt at temperature 0 with --max-tokens new tokens; every level
is measured after warm-up rounds at every level (JAX compiles one program per batch bucket). Tokens are counted as
the streamed chunks that carry text. All traffic stays on 127.0.0.1; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1] / "tests")
from conftest import random_params  # noqa: E402

from kslm_jax.cli import serve  # noqa: E402
from kslm_jax.core import config as config_lib  # noqa: E402
from kslm_jax.model import llama  # noqa: E402
from kslm_jax.objectives import finetune_io  # noqa: E402

SHAPE = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=12",
         "model.d_ff=2048",
         "model.vocab_multiple=32000", "model.dtype=float32", "model.attention=xla", "model.scan_layers=false",
         "data.seq_len=1024", "mesh.data=1"]
LEVELS = (1, 8, 32)
WORDS = ["대한민국의", "주권은", "국민에게", "있고", "모든", "권력은", "국민으로부터", "나온다", "국회는", "법률을"]


def make_workdir(source: Path, out: Path) -> tuple:
    cfg = config_lib.read_workdir_config(source)
    for item in SHAPE:
        config_lib.apply_override(cfg, item)
    out.mkdir(parents=True)
    shutil.copytree(source / "tokenizer", out / "tokenizer")
    c = llama.ModelConfig.from_config(cfg)
    _, params = random_params(c, seed=0, std=0.02)
    # Rows past the tokenizer's pieces get zero logits, below the best of 1000 random ones: llama.cpp (which,
    # unlike our sampler, does not mask them) would otherwise mostly pick padding and stream empty text.
    pieces = cfg.tokenizer.vocab_size
    if c.tie_embeddings:
        params["embed_tokens"]["embedding"][pieces:] = 0
    else:
        params["lm_head"]["kernel"][:, pieces:] = 0
    finetune_io.save_plain(cfg, params, out, force=True)
    return config_lib.read_workdir_config(out), out


class Server:
    def __init__(self, app):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def one_request(port: int, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, tokens) of one streamed completion."""
    import openai
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True):
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
            first = first or time.perf_counter() - t0
    return time.perf_counter() - t0, first or float("nan"), tokens


def level(port: int, clients: int, args) -> dict:
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(args.prompt_words)) for i in range(clients)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda p: one_request(port, p, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in rows)
    ttft = sorted(r[1] for r in rows)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]
    return dict(p50=pct(lat, 0.5), p95=pct(lat, 0.95), ttft50=pct(ttft, 0.5), ttft95=pct(ttft, 0.95),
                tps=sum(r[2] for r in rows) / wall, wall=wall)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a workdir with tokenizer/spm.model and config.json")
    ap.add_argument("--backends", default="jax,llamacpp")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    import jax
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        cfg, wd = make_workdir(Path(args.workdir), Path(tmp) / "ko_125m")
        for backend in args.backends.split(","):
            opts = serve.Options(backend=backend, n_ctx=1024, model_name="bench", threads=args.threads,
                                 max_batch=args.max_batch)
            app, stop = serve.build_app(cfg, wd, opts)
            server = Server(app)
            try:
                # Warm-up: every batch bucket the levels reach (JAX compiles one program per bucket).
                for clients in LEVELS * (2 if backend == "jax" else 1):
                    level(server.port, clients, args)
                for clients in LEVELS:
                    results[backend, clients] = level(server.port, clients, args)
                    print(backend, clients, results[backend, clients], flush=True)
            finally:
                server.close()
                stop()
    device = jax.devices()[0].device_kind if backend == "jax" else "cpu"
    print(f"\nko_125m shape, random weights; prompt {args.prompt_words} words, {args.max_tokens} new tokens, "
          f"greedy, streamed; jax float32 max_batch={args.max_batch} on {device}, llama.cpp F16 "
          f"{args.threads} threads\n")
    print("| backend | clients | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | tokens/s (all clients) |")
    print("|---|---|---|---|---|---|---|")
    for (backend, clients), r in results.items():
        print(f"| {backend} | {clients} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft50']:.2f} | {r['ttft95']:.2f} | "
              f"{r['tps']:.1f} |")


if __name__ == "__main__":
    main()
