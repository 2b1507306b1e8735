#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (about 10 minutes on an H200):
#   1. qtune plan against measured peaks (issues 7, 17), two families: benchmarks/plan_vs_measured.py
#   2. 7B-shape QLoRA at 2048 tokens, qtune against plain TRL + PEFT (issue 8): train_speed.py --gpu-7b
#   3. the serving benchmark on the GPU (issue 5): serve_bench.py
# Run from the repository root after `make install` (pip wheels travel with the tree where the
# machine has no index); results go to ${OUT:-gpu-results}/.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY benchmarks/plan_vs_measured.py --arch llama-3.1-8b qwen2.5-7b --out "$OUT/plan_vs_measured.json" 2>&1 | tee "$OUT/plan_vs_measured.log"
$PY benchmarks/train_speed.py --gpu-7b --reps 2 --steps 10 --out "$OUT/train_speed_7b.json" 2>&1 | tee "$OUT/train_speed_7b.log"
$PY benchmarks/serve_bench.py 2>&1 | tee "$OUT/serve_bench.log"
