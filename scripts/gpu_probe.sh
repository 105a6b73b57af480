#!/usr/bin/env bash
# On the GPU machine: the quantized matmul checked, its variants timed, then the model with it.
# Usage (repo root): bash scripts/gpu_probe.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="python3 scripts/gpu_probe.py"
timeout 60 $P gemv-check 2>&1 | tee "$out/check.log" | grep -v "^E1122\|^===\|^external\|^$"
timeout 200 $P gemv 2>&1 | grep -v "^E11\|^===\|^external\|^$" | tee "$out/gemv.log"
timeout 100 python3 scripts/gpu_check.py 2>&1 | tee "$out/gpu_check.log" | grep "PASS\|FAIL\|fail"
B="python3 -m scripts.cli bench --config llama-2-7b --random-weights --new-tokens 128 --bandwidth 3.13 --peak-tflops 790 --no-warm-compile"
timeout 150 $B --quantize int8 --matmul-impl pallas xla --batch 1 8 --json "$out/int8.json" 2>&1 | tee "$out/int8.log" | tail -8
timeout 40 $NCU --profile-from-start off --clock-control none --set full --page details \
  $P gemv-one --bits 8 > "$out/ncu_int8.txt" 2>&1
grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Grid Size|Waves Per|Issue Slots Busy|Executed Instructions  " "$out/ncu_int8.txt" | head -12
