"""Causal prefill attention on the GPU: flash_attention checked against its `_ref`, then timed
against XLA (the jitted `_ref`) and cuDNN, with an optional tiling sweep (`--tune`).

    python -m scripts.gpu flash-attention [--tune] [--shape B T H G K]
"""
import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import BlockSizes, default_block_sizes, flash_attention, flash_attention_ref
from scripts.gpu.common import best_config, header
from scripts.gpu.timing import time_us


def _inputs(key, batch, seq_len, heads, kv_heads, head_dim, dtype):
    """A first prefill: q [B, T, H, K], k, v [B, T, G, K], q_offset 0, kv_len T."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, seq_len, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq_len, kv_heads, head_dim), dtype)
    zeros = jnp.zeros((batch,), jnp.int32)
    full = jnp.full((batch,), seq_len, jnp.int32)
    return q, k, v, zeros, full


def _cudnn(q, k, v, *_):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def flash(args) -> None:
    header()
    rows = []
    shapes = [  # (B, T, H, G, K)
        (1, 512, 32, 32, 128),
        (1, 2048, 32, 32, 128),
        (1, 4096, 32, 32, 128),
        (1, 2048, 64, 8, 128),
        (1, 2048, 32, 32, 64),
        (4, 1024, 32, 32, 128),
    ]
    tilings = [(64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 32, 4, 4), (64, 64, 4, 4)]
    if args.shape:  # one shape: a wider sweep
        shapes = [tuple(args.shape)]
        tilings += [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
                    (64, 128, 4, 2), (128, 64, 4, 3), (256, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3)]
    candidates = [BlockSizes(block_q=q, block_k=k, num_warps=w, num_stages=s) for q, k, w, s in tilings]
    for batch, seq_len, heads, kv_heads, head_dim in shapes:
        inputs = _inputs(jax.random.key(0), batch, seq_len, heads, kv_heads, head_dim, jnp.bfloat16)
        with jax.default_matmul_precision("highest"):
            ref = flash_attention_ref(*inputs)
        flops = 2.0 * batch * heads * seq_len * seq_len * head_dim  # causal: half of 4*T*S*H*K
        sets = [_inputs(jax.random.key(10 + i), batch, seq_len, heads, kv_heads, head_dim, jnp.bfloat16)
                for i in range(4)]
        name = f"B={batch} T={seq_len} H={heads} G={kv_heads} K={head_dim}"
        default = default_block_sizes(head_dim, heads // kv_heads)
        extra = [c for c in candidates if c != default] if args.tune else []
        best = best_config(name, flash_attention, [None] + extra, inputs, ref, sets,
                           lambda us: f"{flops / us / 1e6:6.1f} TFLOP/s")
        xla_us = time_us(flash_attention_ref, sets, trials=5, reps=2)
        try:
            cudnn_us = time_us(_cudnn, sets)
        except Exception as e:  # cuDNN's fused attention is missing on some builds: report, go on
            print(f"cudnn failed on {name}: {type(e).__name__}: {str(e)[:200]}")
            cudnn_us = float("nan")
        if best is not None:
            rows.append((name, best[0], best[1], xla_us, cudnn_us, best[2], flops))
    print("\nflash_attention, bf16, causal, TFLOP/s causal-effective (2*T*T*H*K per row)")
    print(f"{'shape':34s} {'pallas us':>10s} {'TFLOP/s':>8s} {'rel err':>9s} {'xla us':>9s} {'TFLOP/s':>8s}"
          f" {'cudnn us':>9s} {'TFLOP/s':>8s}  best config")
    for name, us, err, xus, cus, cfg, flops in rows:
        print(f"{name:34s} {us:10.1f} {flops / us / 1e6:8.1f} {err:9.2e} {xus:9.1f} {flops / xus / 1e6:8.1f}"
              f" {cus:9.1f} {flops / cus / 1e6:8.1f}  {cfg or 'default'}")
