#!/usr/bin/env bash
# On the H100: bf16 GEMV variants of the Pallas kernel against XLA, then the best one end to end.
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
P="python3 scripts/gpu_probe.py"
timeout 200 $P gemv --bits 16 --m 1 2>&1 | grep -v "^E11\|^===\|^external\|^$" | tee "$out/gemv16.log" | grep "us/layer"
best=$(grep "us/layer" "$out/gemv16.log" | grep -v xla | sort -k5 -n | head -1 | awk "{print \$4}")
echo "best: $best"
timeout 150 $P bf16-e2e --variant "${best:-default}" 2>&1 | grep -v "^E11\|^===\|^external\|^$" | tail -5
