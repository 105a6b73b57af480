#!/usr/bin/env bash
# On the GPU machine: correctness of the kernels in the model, then the end-to-end 7B benchmarks.
# Usage (repo root): bash scripts/gpu_e2e.sh OUTDIR [bf16|quant]
set -u
out=${1:-/tmp/out}; what=${2:-bf16}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 scripts/gpu_check.py 2>&1 | tee "$out/check.log" | grep "PASS\|FAIL\|fail"
B="python3 -m scripts.cli bench --config llama-2-7b --random-weights --new-tokens 128 --bandwidth 3.13 --peak-tflops 790"
if [ "$what" = bf16 ]; then
  timeout 330 $B --attn-impl xla pallas --prompt-len 128 2048 3968 --json "$out/bf16.json" 2>&1 | tee "$out/bf16.log"
else
  timeout 150 $B --quantize int8 --batch 1 8 64 --no-warm-compile --json "$out/int8.json" \
    --plot "$out/int8.png" 2>&1 | tee "$out/int8.log" | tail -6
  timeout 200 $B --quantize int4 --matmul-impl pallas xla --batch 1 8 64 --no-warm-compile \
    --json "$out/int4.json" --plot "$out/int4.png" 2>&1 | tee "$out/int4.log" | tail -9
fi
