#!/usr/bin/env bash
# On a machine with 4 GPUs: tensor-parallel decode benchmarks, Llama-2-7B TP1/2/4 and -70B TP2/4.
# Usage (repo root): bash scripts/gpu_tp.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B="python3 -m scripts.cli bench --random-weights --prompt-len 128 --new-tokens 64 --no-warm-compile"
run() {  # run NAME TIMEOUT GPUS ARGS...
  local name=$1 t=$2 gpus=$3; shift 3
  echo "== $name"
  CUDA_VISIBLE_DEVICES=$gpus timeout "$t" $B "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v "^E11\|^===\|^external\|^$\|Traceback" "$out/$name.log" | tail -4
  return $rc
}
ATTN=pallas
run 7b_tp2 80 0,1 --config llama-2-7b --tp 2 || { ATTN=xla; run 7b_tp2_xla 80 0,1 --config llama-2-7b --tp 2 --attn-impl xla; }
run 70b_tp4 200 0,1,2,3 --config llama-2-70b --tp 4 --attn-impl $ATTN
run 70b_tp2 180 0,1 --config llama-2-70b --tp 2 --attn-impl $ATTN
run 7b_tp4 60 0,1,2,3 --config llama-2-7b --tp 4 --attn-impl $ATTN
run 7b_tp1 50 0 --config llama-2-7b --attn-impl $ATTN
echo "== summary"
for f in "$out"/*.log; do grep -A1 "^config" "$f" | tail -1; done
