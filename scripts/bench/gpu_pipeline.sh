#!/usr/bin/env bash
# Issue #27's GPU figures for pipeline parallelism, in one prepared run. It needs at least 2 GPUs on one machine
# (one per pipeline stage; NCCL refuses two ranks on one device, so one GPU cannot run a pipeline) and runs nothing
# on CPU. Not yet run: no machine with 2 GPUs was lent to the work that wrote it.
#   1. the bubble: scripts/bench/pipeline_bubble.py on 2 GPUs (NCCL, bf16 autocast), gpt-345m's width and depth,
#      1F1B / interleaved-1F1B / interleaved zero-bubble at m = 2, 4, 8 micro-batches of 4, and 1F1B at GPT-2's
#      vocabulary; the idle fraction of each rank against (p-1)/(m+p-1) and the replay of the schedule;
#   2. `megahf pretrain` of gpt-345m (bf16, seq 1024, global batch 32 = micro-batch 4 x 8) on one GPU against PP=2 on
#      two (1F1B, and interleaved-1F1B with 2 stages per rank): tokens/s from each run's metrics.json and the ratio
#      (2 x (1 - bubble) = 1.78 at most for 1F1B with m = 8).
# Output under $OUT (default scripts/bench/results): pipeline_bubble_gpu.{json,txt}, pipeline_pretrain_gpu.{log,txt}.
#
#   bash scripts/bench/gpu_pipeline.sh              # both parts
#   STEPS=40 bash scripts/bench/gpu_pipeline.sh pretrain     # one part; STEPS: optimizer steps per pretrain job (30)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/setup_env.sh  # the pinned environment (.venv; a CUDA torch where a GPU is present)
OUT=${OUT:-scripts/bench/results}
STEPS=${STEPS:-30}
PART=${1:-all}
python -c "import torch, sys; n = torch.cuda.device_count(); sys.exit(0 if n >= 2 else
  f'gpu_pipeline.sh needs 2 or more GPUs on this machine (one per pipeline stage); it sees {n}')"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $PART == all || $PART == bubble ]]; then
  python scripts/bench/pipeline_bubble.py --device cuda --hidden 1024 --heads 16 --layers 24 --seq 1024 \
    --micro-batch 4 --heavy-vocab 50257 --reps 10 --name pipeline_bubble_gpu --out "$OUT"
fi
if [[ $PART == all || $PART == pretrain ]]; then
  WORK=$(mktemp -d)
  log="$OUT/pipeline_pretrain_gpu.log"
  : > "$log"
  common=(recipes/gpt/gpt-345m.yaml --micro_batch_size 4 --global_batch_size 32 --train_steps "$STEPS"
          --warmup_steps 1 --log_interval 5 --eval_interval 0 --sample_tokens 0 --save_interval 0 --resume none
          --report_to none)
  run() {  # name, launcher..., -- recipe keys...
    local name=$1; shift
    echo "\$ $*" | sed "s|$WORK|\$TMP|g" >> "$log"
    "$@" --output_dir "$WORK/$name" >> "$log" 2>&1
  }
  run pp1 python -m megahf pretrain "${common[@]}"
  run pp2 torchrun --nproc_per_node 2 -m megahf pretrain "${common[@]}" --pipeline_parallel_size 2
  run pp2-interleaved torchrun --nproc_per_node 2 -m megahf pretrain "${common[@]}" --pipeline_parallel_size 2 \
    --pipeline_schedule interleaved-1f1b --virtual_pipeline_size 2
  python - "$WORK" <<'EOF' | tee "$OUT/pipeline_pretrain_gpu.txt"
import json, sys
from pathlib import Path
import torch
work = Path(sys.argv[1])
runs = {name: json.loads((work / name / "metrics.json").read_text()) for name in ("pp1", "pp2", "pp2-interleaved")}
print(f"megahf pretrain gpt-345m, bf16, seq 1024, global batch 32 (micro-batch 4 x 8), the recipe's full "
      f"recompute and chunked loss; {torch.cuda.get_device_name(0)}")
base = runs["pp1"]["tokens_per_second"]
for name, metrics in runs.items():
    speed = metrics["tokens_per_second"]
    mfu = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "-"
    print(f"{name:16} {metrics['layout']}: {speed:,.0f} tokens/s, x{speed / base:.3f} of one GPU; MFU {mfu}; "
          f"peak memory of rank 0 {metrics['peak_memory_gib']:.2f} GiB")
EOF
  rm -rf "$WORK"
fi
