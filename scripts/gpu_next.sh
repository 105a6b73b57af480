#!/usr/bin/env bash
# On the GPU machine: the int8 KV cache and the fused-projection matmul, checked then timed.
#   1. correctness: the model's kernels against XLA (incl. the int8 cache), the matmul kernels;
#   2. kernels: fused vs separate q/k/v and gate/up GEMVs; decode attention bf16 vs int8 cache;
#   3. end to end, Llama-2-7B: int8/int4 weights with pallas vs pallas-fused at batch 1 and 8;
#      bf16 weights with a bf16 vs int8 cache at context ~4096 (batch 1 and 8).
# Usage (repo root): bash scripts/gpu_next.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
quiet() { grep -v "^E11\|^===\|^external\|^$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 scripts/gpu_check.py 2>&1 | tee "$out/check.log" | grep "PASS\|FAIL\|fail"
P="python3 scripts/gpu_probe.py"
timeout 90 $P gemv-check 2>&1 | quiet | tee "$out/gemv_check.log" | tail -6
timeout 120 $P gemv-multi 2>&1 | quiet | tee "$out/gemv_multi.log"
timeout 180 python3 -m pallas_kernels.decode_attention --tune 2>&1 | quiet | tee "$out/decode_attention.log" | tail -26
B="python3 -m scripts.cli bench --config llama-2-7b --random-weights --new-tokens 128 --bandwidth 3.13 --peak-tflops 790 --no-warm-compile"
timeout 170 $B --quantize int8 --matmul-impl pallas pallas-fused --batch 1 8 --json "$out/int8.json" 2>&1 | tee "$out/int8.log" | tail -6
timeout 170 $B --quantize int4 --matmul-impl pallas pallas-fused --batch 1 8 --json "$out/int4.json" 2>&1 | tee "$out/int4.log" | tail -6
timeout 200 $B --kv-cache auto int8 --prompt-len 3968 --batch 1 8 --json "$out/kv.json" --plot "$out/kv.png" 2>&1 | tee "$out/kv.log" | tail -6
# TTFT at 2048: XLA's GEMMs for the prefill program only through cuBLAS instead of its Triton
# fusions (as a global flag this gave 48.7 ms TTFT but slowed decode; here decode is untouched).
timeout 150 $B --prompt-len 2048 --new-tokens 16 --json "$out/ttft.json" 2>&1 | tee "$out/ttft.log" | tail -3
timeout 150 $B --prompt-len 2048 --new-tokens 16 --prefill-xla-option xla_gpu_enable_triton_gemm=false \
  --json "$out/ttft_cublas.json" 2>&1 | tee "$out/ttft_cublas.log" | tail -3
