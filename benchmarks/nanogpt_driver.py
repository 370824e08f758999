"""Times karpathy/nanoGPT's GPT (its model.py, unchanged) the way its train.py trains: torch.compile, bf16 autocast,
TF32 matmuls, fused AdamW, gradient clipping at 1.0, no dropout, no biases. Random tokens, B x T, vocab 50304,
GPT-2 124M shape by default; prints one `nanogpt ...` line per batch size for benchmarks/vs_nanogpt.sh.

    python benchmarks/nanogpt_driver.py --model-py .peers/nanogpt/model.py --batch 16 --batch 32

model.py is not part of this repository (benchmarks/vs_nanogpt.sh says how to get it). Needs a CUDA GPU and
the torch it runs with.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

SHAPES = {"gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
          "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600)}


def load_nanogpt(path: str):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"nanogpt_driver: cannot load {path}; see benchmarks/vs_nanogpt.sh for how to get model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, shape: str, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> dict:
    # Each batch size compiles afresh and statically, as a nanoGPT run of that size would.
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = module.GPTConfig(block_size=seq, vocab_size=vocab, dropout=0.0, bias=False, **SHAPES[shape])
    model = module.GPT(cfg).cuda()
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
    n_params = model.get_num_params()
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * seq   # nanoGPT's own estimate_mfu formula
    step_model = torch.compile(model, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Inputs and targets as separate contiguous tensors, as nanoGPT's get_batch makes them (its loss views them).
    data = [torch.randint(0, vocab, (batch, seq + 1), device="cuda", generator=gen) for _ in range(2)]
    data = [(xy[:, :-1].contiguous(), xy[:, 1:].contiguous()) for xy in data]

    def step(i):
        x, y = data[i % 2]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step(0).item()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * seq
    return dict(impl="nanogpt", shape=shape, batch=batch, seq=seq, params_m=n_params / 1e6, tokens_per_s=tokens / dt,
                step_ms=dt * 1e3, mfu=flops_per_token * tokens / dt / 989e12, compile_s=compile_s,
                peak_gb=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss), device=torch.cuda.get_device_name(),
                torch=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-py", default=".peers/nanogpt/model.py")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--jsonl", default=None, help="append one JSON row per batch size here")
    args = ap.parse_args()
    # As nanoGPT's train.py sets them: TF32 for any float32 matmul left outside autocast.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    module = load_nanogpt(args.model_py)
    for b in args.batch or [16]:
        r = run(module, args.shape, b, args.seq, args.vocab, args.steps, args.warmup)
        print(f"nanogpt {r['shape']} batch {b} seq {r['seq']}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step, "
              f"MFU {r['mfu']:.1%} (6N+12LdT, 989 TFLOP/s), compile {r['compile_s']:.1f} s, peak {r['peak_gb']:.1f} GB, "
              f"loss {r['loss']:.3f} on {r['device']}, torch {r['torch']}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
