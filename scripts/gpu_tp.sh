#!/usr/bin/env bash
# On a machine with 4 GPUs (nvidia-h200-x4): tensor-parallel decode benchmarks. Each part fits in
# one 10-minute device call:
#   scaling (default): bf16 Llama-2-7B TP1/2/4 and -70B TP2/4 (the records in docs/PERFORMANCE.md);
#   fused: 70B bf16 TP4 and TP2 with XLA's GEMVs vs pallas-fused (each shard's q/k/v and gate/up as
#          one launch of the kernel's bits=16 GEMV: XLA's GEMVs ran at half their whole-layer
#          bandwidth on TP4 shards);
#   int8:  70B int8 at TP4 and TP2, the quantized Pallas matmul per shard: pallas vs pallas-fused;
#   nsys:  why 7B TP2 decodes slower than TP1 and TP4: an Nsight Systems kernel-time summary of each.
# Usage (repo root): bash scripts/gpu_tp.sh OUTDIR [scaling|fused|int8|nsys]
set -u
out=${1:-/tmp/out}; part=${2:-scaling}; mkdir -p "$out"
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
if [ "$part" = scaling ]; then
  ATTN=pallas
  run 7b_tp2 80 0,1 --config llama-2-7b --tp 2 || { ATTN=xla; run 7b_tp2_xla 80 0,1 --config llama-2-7b --tp 2 --attn-impl xla; }
  run 70b_tp4 200 0,1,2,3 --config llama-2-70b --tp 4 --attn-impl $ATTN
  run 70b_tp2 180 0,1 --config llama-2-70b --tp 2 --attn-impl $ATTN
  run 7b_tp4 60 0,1,2,3 --config llama-2-7b --tp 4 --attn-impl $ATTN
  run 7b_tp1 50 0 --config llama-2-7b --attn-impl $ATTN
elif [ "$part" = fused ]; then
  run 70b_bf16_tp4 250 0,1,2,3 --config llama-2-70b --tp 4 --matmul-impl xla pallas-fused
  run 70b_bf16_tp2 250 0,1 --config llama-2-70b --tp 2 --matmul-impl xla pallas-fused
elif [ "$part" = int8 ]; then
  run 70b_int8_tp4 250 0,1,2,3 --config llama-2-70b --tp 4 --quantize int8 --matmul-impl pallas pallas-fused
  run 70b_int8_tp2 250 0,1 --config llama-2-70b --tp 2 --quantize int8 --matmul-impl pallas pallas-fused
else
  NSYS=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)
  if [ -z "$NSYS" ]; then echo "no nsys on this machine: profile 7B TP2 with jax.profiler instead"; exit 1; fi
  for tp in 1 2 4; do
    gpus=$(seq -s, 0 $((tp - 1)))
    echo "== nsys 7b tp$tp"
    CUDA_VISIBLE_DEVICES=$gpus timeout 120 "$NSYS" profile -t cuda --stats=false -o "$out/tp$tp" -f true \
      $B --config llama-2-7b --tp $tp --new-tokens 32 > "$out/nsys_tp$tp.log" 2>&1
    timeout 60 "$NSYS" stats -r cuda_gpu_kern_sum -f csv -o "$out/tp${tp}" "$out/tp$tp.nsys-rep" > /dev/null 2>&1
    head -16 "$out/tp${tp}_cuda_gpu_kern_sum.csv" 2>/dev/null | cut -c1-200
    rm -f "$out/tp$tp.nsys-rep" "$out/tp$tp.sqlite"
  done
fi
echo "== summary"
for f in "$out"/*.log; do grep -A2 "^config" "$f" | tail -2; done
