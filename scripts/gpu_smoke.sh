#!/usr/bin/env bash
# On a GPU machine: environment facts, then a smoke run of the whole pipeline.
# Usage (from the repository root): bash scripts/gpu_smoke.sh OUTDIR
set -u
out=${1:-/tmp/out}; shift || true
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/env.txt"
python3 scripts/quickstart.py --dir /tmp/jllm-demo --max-new-tokens 16 > "$out/quickstart.log" 2>&1 \
  && echo "quickstart: ok" || { echo "quickstart: FAILED"; tail -30 "$out/quickstart.log"; }
