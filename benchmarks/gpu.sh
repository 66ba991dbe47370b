#!/usr/bin/env bash
# Every benchmark on CUDA, fp32 and bf16 where it applies, and the training loop in fp16 too (Accelerate's gradient
# scaler; the synthetic backbone is a BART, the family fp16 is offered for); each prints absolute figures (ms/step,
# samples/s, peak memory) under "absolute" and its ratios, as one JSON line. Usage: benchmarks/gpu.sh [ROUNDS] > gpu.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
for precision in fp32 bf16; do
  "$PY" benchmarks/train_step.py --rounds "$ROUNDS" --steps 20 --warmup 5 --precision "$precision" | tail -n 1
  "$PY" benchmarks/loop.py --rounds "$ROUNDS" --steps 100 --records 8000 --precision "$precision" | tail -n 1
done
"$PY" benchmarks/loop.py --rounds "$ROUNDS" --steps 100 --records 8000 --precision fp16 | tail -n 1
"$PY" benchmarks/generate.py --rounds "$ROUNDS" --records 256 --batch-size 64 | tail -n 1
"$PY" benchmarks/startup.py --rounds "$ROUNDS" --questions 600000 | tail -n 1
