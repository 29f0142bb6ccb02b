#!/usr/bin/env bash
# Issue #14's GPU figures in one prepared run on one GPU, for a session that is lent one (nothing here runs on CPU):
#   1. `megahf pretrain` of gpt-345m and gpt-1.2b in bf16 (micro-batch 8, seq 1024), eager and compiled, with and
#      without the chunked loss: tokens/s, MFU against the GPU's bf16 dense peak, peak memory (max_memory_allocated);
#   2. one training step at gpt-345m's shape against transformers' GPT2LMHeadModel (and the Llama-style pair), eager
#      and compiled, with the chunked loss as an extra line: the megahf/peer ratios.
# Output under $OUT (default scripts/bench/results): pretrain_gpu.{json,log,txt},
# train_step_{gpt,llama}345m_gpu_bf16.{json,txt}. Not yet run: no GPU was lent to the work that wrote it.
#
#   bash scripts/bench/gpu_speed.sh                 # both parts
#   STEPS=60 bash scripts/bench/gpu_speed.sh pretrain    # one part; STEPS: optimizer steps per pretrain job (100)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/setup_env.sh  # the pinned environment (.venv; a CUDA torch where a GPU is present)
OUT=${OUT:-scripts/bench/results}
STEPS=${STEPS:-100}
PART=${1:-all}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_speed.sh needs a CUDA GPU')"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $PART == all || $PART == pretrain ]]; then
  python scripts/bench/pretrain.py --configs gpt-345m,gpt-1.2b --layouts 1 \
    --variants chunked,plain,compiled,compiled-plain --steps "$STEPS" --repeats 1 --out "$OUT/pretrain_gpu" \
    | tee "$OUT/pretrain_gpu.txt"
fi
if [[ $PART == all || $PART == train_step ]]; then
  for pair in gpt llama; do
    python scripts/bench/train_step.py --device cuda --dtype bf16 --pair "$pair" --hidden 1024 --layers 24 \
      --heads 16 --seq 1024 --batch 8 --loss-chunk 1024 --compile --json "$OUT/train_step_${pair}345m_gpu_bf16.json" \
      | tee "$OUT/train_step_${pair}345m_gpu_bf16.txt"
  done
fi
