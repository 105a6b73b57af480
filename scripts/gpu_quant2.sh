#!/usr/bin/env bash
# On the H100: the quantized matmul with XLA's split sum against its in-kernel one, then end to end.
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
P="python3 scripts/gpu_probe.py"
F="grep -v ^E11\|^===\|^external\|^$"
timeout 60 $P gemv-check 2>&1 | $F | tail -n 10
timeout 150 $P gemv --variants default int8-fused-sum int4-fused-sum 2>&1 | $F | tee "$out/gemv.log" | grep "us/layer"
timeout 100 python3 scripts/gpu_check.py 2>&1 | grep "PASS\|FAIL\|fail"
B="python3 -m scripts.cli bench --config llama-2-7b --random-weights --new-tokens 128 --bandwidth 3.13 --peak-tflops 790 --no-warm-compile"
timeout 80 $B --quantize int8 2>&1 | grep -A1 "^config" | tail -1
timeout 80 $B --quantize int4 2>&1 | grep -A1 "^config" | tail -1
