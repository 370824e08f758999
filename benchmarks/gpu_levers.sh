#!/usr/bin/env bash
# One device call for issue 21: nanoGPT vs ours, each speed lever alone at 124M, the kernels' correctness on the
# GPU, ko_1b's MFU and the partly unrolled scan at depth, in that order, each step cut off so the whole stays
# inside BUDGET seconds (a step that runs out of time leaves what it printed). Usage on the GPU machine, from the
# repository root, with the kernels extra and .peers/nanogpt/model.py there (see vs_nanogpt.sh):
#   bash benchmarks/gpu_levers.sh [outdir]
#   PARTS="tests ko1b depth attention" BUDGET=540 bash benchmarks/gpu_levers.sh   # a second call's share
# Parts: nanogpt levers tests ko1b depth xl attention (all by default; together they need about 11 minutes on an
# H100, more than one call's 10, so split them over two calls). tokamax's Pallas kernels need a tokamax built for
# the device's jax: 0.0.12 (the last for Python 3.11) fails on jax 0.11.2 (benchmarks/README.md).
# Writes log.txt (everything), rows.jsonl (one JSON row per measurement) and vs_nanogpt.jsonl under outdir.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
budget=${BUDGET:-560}
parts=" ${PARTS:-nanogpt levers tests ko1b depth xl attention} "
export PYTHONUNBUFFERED=1
log="$out/log.txt"
rows="$out/rows.jsonl"
: > "$rows"
step() {  # part, name, seconds, command...: runs it for at most min(seconds, what is left of the budget)
  local part=$1 name=$2 want=$3; shift 3
  [[ "$parts" == *" $part "* ]] || return 0
  local left=$((budget - SECONDS))
  local t=$((want < left ? want : left))
  if [ "$t" -lt 15 ]; then echo "### $name: skipped, ${left}s of the budget left" | tee -a "$log"; return; fi
  echo "### $name (up to ${t}s, at ${SECONDS}s): $*" | tee -a "$log"
  timeout "$t" "$@" 2>&1 | grep -v "^num \|^using fused\|^number of param\|^$\|WARNING:absl\|WARNING  absl" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "### $name: cut off at ${t}s" | tee -a "$log"
}
tp=(python3 benchmarks/train_throughput.py --jsonl "$rows")
m124=(--preset gpt2-124m --batch 16 --steps 10 --warmup 2 --override model.scan_layers=false)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import jax, flax, torch, tokamax, jax_cce; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, 'tokamax', tokamax.__version__, jax.devices())" 2>&1 | tee -a "$log"

step nanogpt "nanoGPT vs ours, batch 16 and 32" 200 env BATCHES="16 32" STEPS=10 bash benchmarks/vs_nanogpt.sh "$out"
step levers "each lever alone, 124M, batch 16, unrolled, after its own base row" 200 "${tp[@]}" "${m124[@]}" \
  --variant "cce_loss=train.loss_impl=cce,train.z_loss=0" \
  --variant "tk_mosaic_attn=model.attention=tokamax_mosaic" \
  --variant "tk_glu=model.kernels=tokamax_glu" \
  --variant "tk_norm=model.kernels=tokamax_norm" \
  --variant "fp8=model.matmul_precision=fp8" \
  --variant "fp8_delayed=model.matmul_precision=fp8_delayed" \
  --variant "tk_triton_attn=model.attention=tokamax_triton"
step tests "kernels vs reference on the GPU (outputs and gradients, packed rows with padding)" 60 \
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py "tests/test_model.py::test_cudnn_matches_reference"
k1b=(--config configs/ko_1b.py --batch 8 --steps 5 --warmup 2 --override mesh.fsdp=1 --override mesh.data=1
     --override model.remat=none)
step ko1b "ko_1b, remat none, batch 8" 40 "${tp[@]}" "${k1b[@]}" --label ko_1b
# cuBLAS for every GEMM, then tokamax's attention on top (its compile alone took 104 s on an H100)
step ko1b "ko_1b, Triton GEMM off" 250 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${tp[@]}" "${k1b[@]}" \
  --label ko_1b_cublas --variant "ko_1b_cublas_tk=model.attention=tokamax_mosaic" \
  --variant "ko_1b_cublas_tk_fp8=model.attention=tokamax_mosaic,model.matmul_precision=fp8" \
  --variant "ko_1b_cublas_tk_fp8_delayed=model.attention=tokamax_mosaic,model.matmul_precision=fp8_delayed"
step depth "depth: scanned stacks, 124M width" 90 "${tp[@]}" --preset gpt2-124m --batch 16 --steps 5 --warmup 1 --skip-base \
  --variant "L12_unroll12=model.scan_unroll=12" \
  --variant "L24_unroll24=model.n_layers=24,model.scan_unroll=24" \
  --variant "L12_unroll6=model.scan_unroll=6" \
  --variant "L24_unroll4=model.n_layers=24,model.scan_unroll=4"
step xl "GPT-2 XL, scan fully unrolled, remat dots" 90 "${tp[@]}" --preset gpt2-xl --batch 8 --steps 5 --warmup 1 \
  --override model.remat=dots --override model.scan_unroll=48 --label xl_u48 \
  --variant "xl_u48_tk=model.attention=tokamax_mosaic"
# The fastest XL measured (sixth push): batch 16, nothing recomputed, cuBLAS GEMMs, tokamax attention. Remat none
# needs more than the 75% of the card that jax's allocator takes by default.
step xl "GPT-2 XL, batch 16, remat none, cuBLAS, tokamax attention" 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${tp[@]}" --preset gpt2-xl --batch 16 --steps 10 --warmup 2 \
  --override model.remat=none --override model.scan_unroll=48 --override model.attention=tokamax_mosaic \
  --label xl16_cublas_tk --variant "xl16_cublas_tk_fp8_delayed=model.matmul_precision=fp8_delayed"
step attention "attention kernels alone, fwd+bwd, packed rows" 50 python3 benchmarks/attention_kernels.py --reps 10 --jsonl "$rows"
echo "### done at ${SECONDS}s" | tee -a "$log"
