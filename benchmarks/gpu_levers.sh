#!/usr/bin/env bash
# One device call: the cuDNN-vs-reference attention checks, then train_throughput.py on the nanoGPT shapes
# with one lever changed at a time. Usage on the GPU machine: bash benchmarks/gpu_levers.sh [outdir]
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -m pytest -q tests/test_model.py -k "cudnn or packed or segment" 2>&1 | tail -3 | tee "$out/cudnn_check.txt"
bench() {  # name, then train_throughput.py arguments
  local name=$1; shift
  echo "### $name: $*" | tee -a "$out/levers.txt"
  python3 benchmarks/train_throughput.py --steps 20 "$@" 2>&1 | tail -n +2 | grep -v '^$' | tee -a "$out/levers.txt"
}
bench "reference attention, scanned layers" --preset gpt2-124m --batch 16 --override model.attention=xla
bench "cuDNN attention (mask + causal), scanned layers" --preset gpt2-124m --batch 16
bench "cuDNN ragged segments" --preset gpt2-124m --batch 16 --override model.attention=cudnn_packed
bench "chunked loss 512" --preset gpt2-124m --batch 16 --override train.loss_chunk=512
bench "unrolled layers" --preset gpt2-124m --batch 16 --batch 32 --override model.scan_layers=false
bench "ko_1b, remat dots, unrolled" --config configs/ko_1b.py --batch 8 --override mesh.fsdp=1 --override mesh.data=1
bench "gpt2-xl fits: scan + remat dots" --preset gpt2-xl --batch 8 --steps 5 --override model.remat=dots
