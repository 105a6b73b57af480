#!/usr/bin/env bash
# On a machine with 2 GPUs: TP2 decode as one process driving both GPUs, then as one process per
# GPU joined by jax.distributed on localhost. Usage (repo root): bash scripts/gpu_mp.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
B="python3 -m scripts.cli bench --random-weights --prompt-len 128 --new-tokens 64 --no-warm-compile --tp 2"
for cfg in llama-2-7b llama-2-70b; do
  t=$([ $cfg = llama-2-7b ] && echo 80 || echo 170)
  echo "== $cfg one process, 2 GPUs"
  timeout $t $B --config $cfg > "$out/${cfg}_single.log" 2>&1; grep -A1 "^config" "$out/${cfg}_single.log" | tail -1
  echo "== $cfg two processes, 1 GPU each"
  port=$((20000 + RANDOM % 20000))
  for pid in 0 1; do
    CUDA_VISIBLE_DEVICES=$pid timeout $t $B --config $cfg --coordinator 127.0.0.1:$port \
      --num-processes 2 --process-id $pid > "$out/${cfg}_mp$pid.log" 2>&1 &
  done
  wait
  grep -A1 "^config" "$out/${cfg}_mp0.log" | tail -1 || tail -n 5 "$out/${cfg}_mp0.log"
done
