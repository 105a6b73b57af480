#!/usr/bin/env bash
# On the GPU machine: the int8 KV cache, the fused projections and prefill through cuBLAS, checked
# then timed. Three parts, each inside one 10-minute call:
#   kernels: the model's kernels against XLA (incl. the int8 cache and fused projections), the
#            matmul kernels; fused vs separate q/k/v and gate/up GEMVs (int8, int4, bf16 also
#            against XLA's dots); decode attention bf16 vs int8 cache (with a tiling sweep);
#   quant:   Llama-2-7B int8/int4 weights with pallas vs pallas-fused at batch 1 and 8;
#   bf16:    Llama-2-7B bf16: xla vs pallas-fused GEMVs; a bf16 vs int8 cache at context ~4096
#            (batch 1 and 8); TTFT at 2048 with the prefill's GEMMs on cuBLAS.
# Usage (repo root): bash scripts/gpu_next.sh OUTDIR kernels|quant|bf16
set -u
out=${1:-/tmp/out}; part=${2:-kernels}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
quiet() { grep -v "^E11\|^===\|^external\|^$"; }
B="python3 -m scripts.cli bench --config llama-2-7b --random-weights --new-tokens 128 --bandwidth 3.13 --peak-tflops 790 --no-warm-compile"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$part" = kernels ]; then
  timeout 150 python3 scripts/gpu_check.py 2>&1 | tee "$out/check.log" | grep "PASS\|FAIL\|fail"
  P="python3 scripts/gpu_probe.py"
  timeout 90 $P gemv-check 2>&1 | quiet | tee "$out/gemv_check.log" | tail -6
  timeout 150 $P gemv-multi --bits 8 4 16 2>&1 | quiet | tee "$out/gemv_multi.log"
  timeout 200 python3 -m pallas_kernels.decode_attention --tune 2>&1 | quiet | tee "$out/decode_attention.log" | tail -26
elif [ "$part" = quant ]; then
  timeout 250 $B --quantize int8 --matmul-impl pallas pallas-fused --batch 1 8 --json "$out/int8.json" 2>&1 | tee "$out/int8.log" | tail -6
  timeout 250 $B --quantize int4 --matmul-impl pallas pallas-fused --batch 1 8 --json "$out/int4.json" 2>&1 | tee "$out/int4.log" | tail -6
else
  timeout 100 $B --matmul-impl xla pallas-fused --json "$out/bf16.json" 2>&1 | tee "$out/bf16.log" | tail -4
  timeout 200 $B --kv-cache auto int8 --prompt-len 3968 --batch 1 8 --json "$out/kv.json" --plot "$out/kv.png" 2>&1 | tee "$out/kv.log" | tail -6
  # As a global flag, cuBLAS GEMMs gave 48.7 ms TTFT but slowed decode; here only prefill uses them.
  timeout 80 $B --prompt-len 2048 --new-tokens 16 --json "$out/ttft.json" 2>&1 | tee "$out/ttft.log" | tail -3
  timeout 80 $B --prompt-len 2048 --new-tokens 16 --prefill-xla-option xla_gpu_enable_triton_gemm=false \
    --json "$out/ttft_cublas.json" 2>&1 | tee "$out/ttft_cublas.log" | tail -3
fi
