#!/usr/bin/env bash
# nanoGPT and ours side by side, same GPU, same call: GPT-2 124M shape, B x 1024 random tokens, vocab 50304, bf16.
# nanoGPT: its own model.py under torch.compile with bf16 autocast and fused AdamW (benchmarks/nanogpt_driver.py).
# Ours: benchmarks/train_throughput.py --preset gpt2-124m (Llama blocks, tied embeddings, 4 packed documents per
# row, document-masked attention) with the overrides in OURS. Prints tokens/s of each and ours / nanoGPT.
#
#   bash benchmarks/vs_nanogpt.sh [outdir]                    # BATCHES="16 32" by default
#   BATCHES="16" OURS="--override model.scan_layers=false --override model.kernels=tokamax_norm" bash benchmarks/vs_nanogpt.sh
#
# nanoGPT's model.py is not in this repository. Put it at .peers/nanogpt/model.py (.gitignore'd), from
# https://github.com/karpathy/nanoGPT (this was timed with commit 3adf61e1), e.g.
#   mkdir -p .peers/nanogpt && git -C /tmp clone -q https://github.com/karpathy/nanoGPT && cp /tmp/nanoGPT/model.py .peers/nanogpt/
# and carry .peers to the GPU machine, which has no network.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
model_py=${NANOGPT_MODEL:-.peers/nanogpt/model.py}
batches=${BATCHES:-16 32}
# Our best measured setting by default (benchmarks/README.md, fourth push): tokamax's Mosaic GPU attention where
# tokamax imports, cuDNN's otherwise.
best="--override model.scan_layers=false"
python3 -c "import tokamax" 2>/dev/null && best="$best --override model.attention=tokamax_mosaic"
ours=${OURS:-$best}
steps=${STEPS:-20}
[ -f "$model_py" ] || { echo "vs_nanogpt.sh: no $model_py; see the comment at the top of this script" >&2; exit 1; }
rows="$out/vs_nanogpt.jsonl"
: > "$rows"
export PYTHONUNBUFFERED=1
bargs=(); for b in $batches; do bargs+=(--batch "$b"); done
python3 benchmarks/nanogpt_driver.py --model-py "$model_py" "${bargs[@]}" --steps "$steps" --jsonl "$rows" 2>&1 \
  | grep -v "^num \|^using fused\|^number of param"
# shellcheck disable=SC2086  # OURS is a list of arguments
python3 benchmarks/train_throughput.py --preset gpt2-124m "${bargs[@]}" --steps "$steps" $ours --label vs_nanogpt \
  --jsonl "$rows" 2>&1 | tail -n +2 | grep -v '^$'
python3 - "$rows" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
theirs = {r["batch"]: r for r in rows if r["impl"] == "nanogpt"}
ours = {r["batch"]: r for r in rows if r["impl"] == "ours"}
print(f"\n{'batch':>6s}{'nanoGPT tok/s':>15s}{'ours tok/s':>13s}{'ours/nanoGPT':>14s}   device")
for b in sorted(theirs.keys() & ours.keys()):
    print(f"{b:>6d}{theirs[b]['tokens_per_s']:>15,.0f}{ours[b]['tokens_per_s']:>13,.0f}"
          f"{ours[b]['tokens_per_s'] / theirs[b]['tokens_per_s']:>13.2f}x   {theirs[b]['device']}")
missing = sorted(theirs.keys() ^ ours.keys())
if missing:
    print(f"no pair for batch {missing}: one side failed (see above)")
EOF
