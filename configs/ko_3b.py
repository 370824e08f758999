"""A ~3.0B Korean model (Llama-3.2-3B-like body: d 3072, 28 layers, GQA 24/8, d_ff 8192) for a TPU slice, FSDP.

Compiled here for TPUs (`kslm compile`; the compiler's numbers, not a TPU run): fits 2 x v5e-256 (mesh.data=2 across
the slices, fsdp 256 inside, batch 512) in 4.2 of 16 GiB per chip. benchmarks/README.md has the table; check
another slice with the first command below (the launcher runs it as its preflight).
    kslm compile --config configs/ko_3b.py --topology v5e-256
    python launch/tpu_pod.py --name ko-3b --zone ZONE --accelerator-type v5e-256 --runtime-version v2-alpha-tpuv5-lite \\
        --gcsfuse BUCKET --config configs/ko_3b.py --workdir /mnt/gcs/BUCKET/runs/ko_3b
"""
from kslm_jax.core.config import base_config


def get_config():
    c = base_config()
    c.tokenizer.vocab_size = 32000
    c.model.d_model = 3072
    c.model.n_layers = 28
    c.model.n_heads = 24
    c.model.n_kv_heads = 8
    c.model.d_ff = 8192
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"    # splash on TPU, cudnn on GPU, xla on CPU
    c.model.scan_layers = True    # one compiled layer body: compile time does not grow with depth
    c.model.remat = "dots"        # matmul outputs kept, the rest recomputed: activations of 28 layers fit
    c.data.seq_len = 2048
    c.data.workers = 8
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.batch_size = 256
    c.train.log_every = 20
    c.train.eval_every = 2000
    c.train.eval_batches = 50
    c.checkpoint.every_steps = 1000
    return c
