#!/usr/bin/env bash
# Multi-GPU scaling on one host: the ~1B recipe on 1 GPU and on all GPUs of the machine under data parallel,
# FSDP and tensor parallel, then a checkpoint written on all GPUs restored (eval and resumed training) on one.
#
#   bash benchmarks/multi_gpu.sh throughput [BATCH_PER_GPU [--override K=V ...]]   # default 8 × 2048 per GPU
#   bash benchmarks/multi_gpu.sh checkpoint REVIEWS.jsonl.gz    # a tiny run on the reviews, N GPUs -> 1 GPU
#
# One process drives every GPU of the host (jax.devices()); NCCL does the collectives. NVLink multicast stays
# off (NCCL_NVLS_ENABLE=0): the machines this was measured on share their GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0
N=$(python3 -c "import jax; print(jax.device_count())")
bench() { python3 benchmarks/train_throughput.py --config configs/ko_1b.py --steps 10 --warmup 3 "$@" "${more[@]}" 2>&1 | tail -3; }

case "${1:-}" in
throughput)
    B=${2:-8}
    shift $(( $# > 1 ? 2 : 1 ))
    more=("$@")
    echo "== 1 GPU"
    CUDA_VISIBLE_DEVICES=0 bench --batch "$B" --override mesh.data=1 --override mesh.fsdp=1
    echo "== $N GPUs, data parallel (replicated parameters and optimizer state)"
    bench --batch $((B * N)) --override mesh.data="$N" --override mesh.fsdp=1 --override mesh.rules=dp
    echo "== $N GPUs, FSDP (parameters, gradients and optimizer state sharded)"
    bench --batch $((B * N)) --override mesh.data=1 --override mesh.fsdp="$N" --override mesh.rules=fsdp
    echo "== $N GPUs, tensor parallel (heads and MLP channels split; every GPU sees the whole batch)"
    bench --batch "$B" --override mesh.data=1 --override mesh.fsdp=1 --override mesh.tensor="$N" \
        --override mesh.rules=fsdp_tp
    ;;
checkpoint)
    W=${W:-/tmp/kslm_multi_gpu_ckpt}
    rm -rf "$W"
    tiny=(--config configs/tiny_ko.py --config.data.sources="$2" --config.data.text_field=text
          --config.tokenizer.vocab_size=4000 --config.train.steps=40 --config.checkpoint.every_steps=20
          --config.train.log_every=10 --config.logging.progress_bar=false)
    for stage in prepare tokenizer tokenize; do python3 -m kslm_jax "$stage" --workdir "$W" "${tiny[@]}"; done
    echo "== train 40 steps on $N GPUs (FSDP over $N)"
    python3 -m kslm_jax train --workdir "$W" --config.mesh.data=1 --config.mesh.fsdp="$N"
    held_out() { python3 -c "import json; r = json.load(open('$W/eval/lm.json'))['model']; \
print('held-out loss %.7f, bits/char %.7f' % (r['loss'], r['bits_per_char']))"; }
    echo "== eval on $N GPUs"
    python3 -m kslm_jax eval --workdir "$W" --config.mesh.data=1 --config.mesh.fsdp="$N" >/dev/null && held_out
    echo "== eval of the same checkpoint on 1 GPU"
    CUDA_VISIBLE_DEVICES=0 python3 -m kslm_jax eval --workdir "$W" --config.mesh.data=1 --config.mesh.fsdp=1 \
        >/dev/null && held_out
    echo "== resume on 1 GPU to step 60"
    CUDA_VISIBLE_DEVICES=0 python3 -m kslm_jax train --workdir "$W" --config.mesh.data=1 --config.mesh.fsdp=1 \
        --config.train.steps=60 2>&1 | grep -E "restored|step +60"
    ;;
*)
    sed -n 2,9p "$0"; exit 2 ;;
esac
