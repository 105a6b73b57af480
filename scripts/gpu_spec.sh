#!/usr/bin/env bash
# On the GPU machine: speculative decoding checked on the tiny config with the Pallas kernels, then
# Llama-2-7B bf16 (random weights) with int8 and int4 self-drafts, k in {2, 4, 6}, and the cost model.
# Usage (repo root): bash scripts/gpu_spec.sh OUTDIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 110 python3 - <<'PY' 2>&1 | tee "$out/check.log" | grep -v "^E11\|^W11"
import jax, jax.numpy as jnp, numpy as np
import jllm
from jllm import speculative as sp
from jllm.config import LlamaConfig
from jllm.generate import Model
from jllm.model import init_params
cfg = LlamaConfig.from_name("tiny", ffn_dim=256, dim=128)
# Matrices at std 0.1 instead of 0.02: decisive logits, so greedy choices are no near-ties.
params = jax.tree.map(lambda w: w * 5 if w.ndim == 2 else w, init_params(cfg, jax.random.key(1), jnp.float32))
m = Model(params=params, cfg=cfg, attn_impl="pallas", matmul_impl="pallas")
rng = np.random.default_rng(0)
prompts = [rng.integers(3, 512, n).tolist() for n in (5, 30, 12)]
ref = jllm.generate(m, prompts, max_new_tokens=40, stop_token_ids=[])
for name, p in [("int8", sp.self_draft(m, "int8")), ("int4", sp.self_draft(m, "int4", 32)), ("lookup", sp.PromptLookup(3))]:
    for k in (2, 4):
        got = jllm.generate(m, prompts, max_new_tokens=40, stop_token_ids=[], speculative=sp.Speculative(p, k))
        same = [a.tokens == b.tokens for a, b in zip(got, ref)]
        print(f"tiny float32 pallas {name} k={k}: {'PASS' if all(same) else 'FAIL'} {same} {sp.format_stats([g.stats for g in got])}")
PY
timeout 450 python3 -m scripts.gpu.speculative_bench --config llama-2-7b --ks 2 4 6 --json "$out/spec.json" \
  --plot "$out/spec.png" 2>&1 | grep -v "^E11\|^W11" | tee "$out/spec.log"
