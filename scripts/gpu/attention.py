"""Decode and paged attention on the GPU: checked against the `_ref`, then timed (µs and TB/s over
the KV bytes read), with an optional tiling sweep (`--tune`); and paged chunked prefill
(paged_attention_mq) against flash_attention over a static cache of the same keys.

    python -m scripts.gpu decode-attention [--tune] [--loop] [--shape B S L]
    python -m scripts.gpu paged-attention [--tune] [--loop] [--shape B S] [--cache bf16 int8]

--loop times each kernel in an on-device loop (`timing.loop_time_us`) instead of `time_us`,
whose dispatch floor (about 18-20 µs a call on an H200) hides kernels at one to a few rows.
    python -m scripts.gpu paged-prefill [--tune]
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _triton
from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_ref
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import quantize_kv
from pallas_kernels.paged_attention import (
    paged_attention, paged_attention_mq, paged_attention_mq_ref, paged_attention_ref,
)
from scripts.gpu.common import PEAK_TBS, best_config, header
from scripts.gpu.timing import loop_time_us, num_sets, time_us

SHAPES = [(b, s, 32, 32, 128) for b in (1, 8, 64) for s in (512, 2048, 4096)]  # (B, S, H, G, K)


def _inputs(key, batch, seq_len, heads, kv_heads, head_dim, dtype, length=None):
    """q [B, H, K], k, v [B, S, G, K] random normal, lengths [B] = length (default S)."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq_len, kv_heads, head_dim), dtype)
    return q, k, v, jnp.full((batch,), seq_len if length is None else length, jnp.int32)


def _int8_inputs(key, batch, seq_len, heads, kv_heads, head_dim, length=None):
    """bf16 q with an int8 cache quantized from normal keys and values: (q, k, v, lengths, k_scale, v_scale)."""
    q, k, v, lengths = _inputs(key, batch, seq_len, heads, kv_heads, head_dim, jnp.bfloat16, length)
    (k, k_scale), (v, v_scale) = jax.jit(quantize_kv)(k), jax.jit(quantize_kv)(v)
    return q, k, v, lengths, k_scale, v_scale


def _decode_int8(q, k, v, lengths, k_scale, v_scale, *, block_sizes=None):
    """decode_attention with the scales positional, for time_us and best_config."""
    return decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, block_sizes=block_sizes)


def _decode_int8_ref(q, k, v, lengths, k_scale, v_scale):
    return decode_attention_ref(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale)


def kv_bytes(batch: int, seq_len: int, kv_heads: int, head_dim: int, cache: str) -> int:
    """Bytes of k and v read at full length: bf16 values, or int8 values plus a float32 scale per
    token and KV head."""
    per_head = 2 * head_dim if cache == "bf16" else head_dim + 4
    return 2 * batch * seq_len * kv_heads * per_head


def decode(args) -> None:
    """decode_attention, bf16 and int8 cache, against the jitted `_ref` (XLA): the benchmark shapes
    at full lengths, or --shape B S L (L keys of a cache of S, 32 heads)."""
    header()
    timer = loop_time_us if args.loop else time_us
    rows = []
    tuned = {(1, 4096), (1, 2048), (1, 512), (8, 512)}
    shapes = [shape + (None,) for shape in
              SHAPES + [(1, 4096, 64, 8, 128), (8, 4096, 64, 8, 128), (1, 4096, 32, 8, 128)]]
    candidates = [
        BlockSizes(block_k=bk, num_splits=ns, num_warps=w, num_stages=st)
        for bk, ns, w, st in [
            (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (64, 16, 4, 3),
            (128, None, 4, 2), (64, None, 4, 4), (32, None, 4, 4), (64, None, 8, 3),
        ]
    ]
    if args.shape:  # many short rows (fifteenth round): the pipeline depth, block and warps
        batch, seq_len, length = args.shape
        if not (batch >= 1 and 1 <= length <= seq_len):
            raise SystemExit(f"--shape {batch} {seq_len} {length}: need B >= 1 and 1 <= L <= S")
        shapes, tuned = [(batch, seq_len, 32, 32, 128, length)], {(batch, seq_len)}
        candidates = [BlockSizes(block_k=bk, num_warps=w, num_stages=st) for bk, w, st in [
            (64, 4, 4), (64, 4, 2), (64, 4, 1), (32, 4, 2), (32, 2, 2), (128, 4, 2), (64, 2, 2)]]
    for batch, seq_len, heads, kv_heads, head_dim, length in shapes:
        name = f"B={batch} S={seq_len} H={heads} G={kv_heads} K={head_dim}" + (f" L={length}" if length else "")
        configs = [None] + (candidates if args.tune and (batch, seq_len) in tuned else [])
        for cache in ("bf16", "int8"):
            if cache == "bf16":
                make = functools.partial(_inputs, dtype=jnp.bfloat16, length=length)
                kernel, xla = decode_attention, decode_attention_ref
            else:
                make = functools.partial(_int8_inputs, length=length)
                kernel, xla = _decode_int8, _decode_int8_ref
            inputs = make(jax.random.key(0), batch, seq_len, heads, kv_heads, head_dim)
            with jax.default_matmul_precision("highest"):
                ref = xla(*inputs)
            nbytes = kv_bytes(batch, length or seq_len, kv_heads, head_dim, cache)
            sets = [make(jax.random.key(10 + i), batch, seq_len, heads, kv_heads, head_dim)
                    for i in range(num_sets(nbytes))]
            best = best_config(f"{name} {cache}", kernel, configs, inputs, ref, sets,
                               lambda us, nbytes=nbytes: f"{nbytes / us / 1e6:5.2f} TB/s", timer=timer)
            xla_us = timer(xla, sets)
            if best is not None:
                rows.append((name, cache, nbytes, best[0], best[1], xla_us, best[2]))
            del sets, inputs
    print(f"\ndecode_attention, TB/s over KV bytes read (int8: values + float32 scales; "
          f"H100 read peak {PEAK_TBS} TB/s); rel err against the _ref of the same cache")
    print(f"{'shape':34s} {'cache':5s} {'KV MB':>7s} {'pallas us':>10s} {'TB/s':>6s} {'%peak':>6s}"
          f" {'rel err':>9s} {'xla us':>9s} {'TB/s':>6s}  best config")
    for name, cache, nbytes, us, err, xus, cfg in rows:
        tbs = nbytes / us / 1e6
        print(f"{name:34s} {cache:5s} {nbytes / 1e6:7.1f} {us:10.1f} {tbs:6.2f} {100 * tbs / PEAK_TBS:5.0f}%"
              f" {err:9.2e} {xus:9.1f} {nbytes / xus / 1e6:6.2f}  {cfg or 'default'}")


def scattered_pool(key, batch, seq_len, kv_heads, head_dim, page_size, dtype):
    """A pool holding `batch` rows of seq_len tokens on randomly permuted pages:
    (k_pages, v_pages [P, page_size, G, K], tables [B, pages per row])."""
    pages_per_row = pl.cdiv(seq_len, page_size)
    num_pages = batch * pages_per_row
    kk, kv, kp = jax.random.split(key, 3)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = jax.random.normal(kk, shape, dtype)
    v_pages = jax.random.normal(kv, shape, dtype)
    tables = jax.random.permutation(kp, num_pages).reshape(batch, pages_per_row).astype(jnp.int32)
    return k_pages, v_pages, tables


def scattered_int8_pool(key, batch, seq_len, kv_heads, head_dim, page_size):
    """scattered_pool's bf16 pool quantized: (k_pages, v_pages, tables, k_scale_pages, v_scale_pages).

    quantize_kv reads pages [P, page_size, G, K] as [B, T, G, K], so its scales come out as the
    scale pages [P, G, page_size].
    """
    k_pages, v_pages, tables = scattered_pool(key, batch, seq_len, kv_heads, head_dim, page_size, jnp.bfloat16)
    quantize = jax.jit(quantize_kv)
    (k_pages, k_scale_pages), (v_pages, v_scale_pages) = quantize(k_pages), quantize(v_pages)
    return k_pages, v_pages, tables, k_scale_pages, v_scale_pages


def _paged_int8(q, k_pages, v_pages, tables, lengths, k_scale_pages, v_scale_pages, *, block_sizes=None):
    """paged_attention with the scale pages positional, for time_us and best_config."""
    return paged_attention(q, k_pages, v_pages, tables, lengths, k_scale_pages=k_scale_pages,
                           v_scale_pages=v_scale_pages, block_sizes=block_sizes)


def _paged_int8_ref(q, k_pages, v_pages, tables, lengths, k_scale_pages, v_scale_pages):
    return paged_attention_ref(q, k_pages, v_pages, tables, lengths, k_scale_pages=k_scale_pages,
                               v_scale_pages=v_scale_pages)


def paged(args) -> None:
    """paged_attention (one query per row), bf16 and int8 pages, pages randomly permuted, against
    decode_attention over a static cache of the same kind."""
    header()
    timer = loop_time_us if args.loop else time_us
    rows = []
    tuned = {(1, 4096), (1, 2048)}
    candidates = [
        BlockSizes(block_k=64, num_splits=ns, num_warps=4, num_stages=st)
        for ns, st in [(4, 4), (8, 4), (32, 4), (16, 3)]
    ]
    shapes, page_sizes = SHAPES, (16, 64)
    # int8 pages at R = 1 and few rows: the FMA path with fewer or more splits, and the dot path
    int8_candidates = [BlockSizes(num_splits=ns, num_stages=1) for ns in (2, 4, 16)]
    int8_candidates += [BlockSizes(num_stages=1, row_max=True), BlockSizes(block_k=32, num_stages=1, row_max=True)]
    int8_candidates += [BlockSizes(num_stages=st, fma=False) for st in (2, 4)]
    kv_heads = getattr(args, "kv_heads", None) or 32
    if kv_heads != 32:  # GQA (Llama-3.x 8B and 70B: 8 KV heads of 32 query heads)
        shapes = [(b, s, 32, kv_heads, 128) for b, s, *_ in shapes]
    if args.shape:  # one shape, pages of 16 (the engine's), a wider sweep without forced splits
        shapes, page_sizes = [(*args.shape, 32, kv_heads, 128)], (16,)
        tuned = {tuple(args.shape)}
        candidates = [BlockSizes(block_k=bk, num_warps=w, num_stages=st)
                      for bk in (16, 32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
        # int8 pages at R = 1: the FMA path's tilings (stages do not apply), and the dot path's best
        int8_candidates = [BlockSizes(block_k=bk, num_warps=w, num_stages=1)
                           for bk, w in ((32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8))]
        int8_candidates += [BlockSizes(block_k=bk, num_warps=w, num_stages=1, row_max=True)
                            for bk, w in ((32, 4), (64, 4), (32, 8), (64, 8))]
        int8_candidates += [BlockSizes(block_k=bk, num_stages=2, fma=False) for bk in (64, 128)]
    for page_size in page_sizes:
        for batch, seq_len, heads, kv_heads, head_dim in shapes:
            q = jax.random.normal(jax.random.key(0), (batch, heads, head_dim), jnp.bfloat16)
            lengths = jnp.full((batch,), seq_len, jnp.int32)
            name = f"page={page_size} B={batch} S={seq_len} H={heads} G={kv_heads}"
            for cache in args.cache:  # each against decode_attention
                sweep = int8_candidates if cache == "int8" and heads == kv_heads else candidates
                configs = [None] + (sweep if args.tune and (batch, seq_len) in tuned else [])
                if cache == "bf16":
                    make_pool = functools.partial(scattered_pool, dtype=jnp.bfloat16)
                    kernel, xla = paged_attention, paged_attention_ref
                    make_dense = functools.partial(_inputs, dtype=jnp.bfloat16)
                    dense_kernel = decode_attention
                else:
                    make_pool, kernel, xla = scattered_int8_pool, _paged_int8, _paged_int8_ref
                    make_dense, dense_kernel = _int8_inputs, _decode_int8

                def make(key, make_pool=make_pool):
                    k_pages, v_pages, tables, *scales = make_pool(key, batch, seq_len, kv_heads, head_dim, page_size)
                    return (q, k_pages, v_pages, tables, lengths, *scales)

                inputs = make(jax.random.key(0))
                with jax.default_matmul_precision("highest"):
                    ref = xla(*inputs)
                nbytes = kv_bytes(batch, seq_len, kv_heads, head_dim, cache)
                sets = [make(jax.random.key(10 + i)) for i in range(num_sets(nbytes))]
                best = best_config(f"{name} {cache}", kernel, configs, inputs, ref, sets,
                                   lambda us, nbytes=nbytes: f"{nbytes / us / 1e6:5.2f} TB/s", timer=timer)
                del sets, inputs
                dense = [make_dense(jax.random.key(10 + i), batch, seq_len, heads, kv_heads, head_dim)
                         for i in range(num_sets(nbytes))]
                with _triton.quiet():
                    dense_us = timer(dense_kernel, dense)
                del dense
                if best is not None:
                    rows.append((name, cache, nbytes, best[0], best[1], dense_us, best[2]))
    print("\npaged_attention, full lengths, pages randomly permuted, TB/s over KV bytes read (int8: codes + "
          "float32 scales); decode = decode_attention over a static cache of the same kind")
    print(f"{'shape':38s} {'cache':5s} {'KV MB':>7s} {'paged us':>9s} {'TB/s':>6s} {'rel err':>9s} {'decode us':>10s}"
          f" {'paged/decode':>12s}  best config")
    for name, cache, nbytes, us, err, dus, cfg in rows:
        print(f"{name:38s} {cache:5s} {nbytes / 1e6:7.1f} {us:9.1f} {nbytes / us / 1e6:6.2f} {err:9.2e} {dus:10.1f}"
              f" {us / dus:12.2f}  {cfg or 'default'}")


def paged_prefill(args) -> None:
    """paged_attention_mq over a chunk of T new tokens after c cached ones (bf16 pages of 16,
    randomly permuted), against flash_attention over a static cache holding the same keys.
    TFLOP/s count 4 * K flops per (query, visible key) pair."""
    header()
    rows = []
    candidates = [BlockSizes(block_k=bk, block_q=bq, num_warps=w, num_stages=st)
                  for bk, bq, w, st in [(64, 16, 4, 3), (64, 32, 8, 3), (128, 16, 8, 3), (32, 16, 4, 4)]]
    for batch, chunk, cached, heads, kv_heads in [(1, 512, 0, 32, 32), (1, 512, 2048, 32, 32), (4, 128, 2048, 32, 32),
                                                  (1, 512, 2048, 64, 8), (8, 64, 4096, 64, 8)]:
        head_dim, page_size, total = 128, 16, cached + chunk
        name = f"B={batch} T={chunk} after {cached} H={heads} G={kv_heads}"
        q = jax.random.normal(jax.random.key(1), (batch, chunk, heads, head_dim), jnp.bfloat16)
        lengths = jnp.full((batch,), total, jnp.int32)
        q_start, n_queries = lengths - chunk, jnp.full((batch,), chunk, jnp.int32)

        def make(key):
            k_pages, v_pages, tables = scattered_pool(key, batch, total, kv_heads, head_dim, page_size, jnp.bfloat16)
            return q, k_pages, v_pages, tables, lengths, q_start, n_queries

        def make_dense(key):  # the same keys as make(key), in the static layout [B, S, G, K]
            k_pages, v_pages, tables = scattered_pool(key, batch, total, kv_heads, head_dim, page_size, jnp.bfloat16)
            k, v = (p[tables].reshape(batch, -1, kv_heads, head_dim) for p in (k_pages, v_pages))
            return q, k, v, q_start, lengths

        inputs = make(jax.random.key(0))
        with jax.default_matmul_precision("highest"):
            ref = paged_attention_mq_ref(*inputs)
        flops = 4.0 * head_dim * heads * batch * (chunk * cached + chunk * (chunk + 1) / 2)
        nbytes = kv_bytes(batch, total, kv_heads, head_dim, "bf16")
        sets = [make(jax.random.key(10 + i)) for i in range(min(4, num_sets(nbytes)))]
        best = best_config(name, paged_attention_mq, [None] + (candidates if args.tune else []), inputs, ref, sets,
                           lambda us: f"{flops / us / 1e6:6.1f} TFLOP/s")
        del sets, inputs
        dense = [make_dense(jax.random.key(10 + i)) for i in range(min(4, num_sets(nbytes)))]
        with _triton.quiet():
            flash_us = time_us(flash_attention, dense)
        del dense
        if best is not None:
            rows.append((name, best[0], best[1], flash_us, best[2], flops))
    print("\npaged_attention_mq (chunked prefill over pages of 16), bf16, against flash_attention over the same "
          "keys in a static cache")
    print(f"{'shape':36s} {'paged us':>9s} {'TFLOP/s':>8s} {'rel err':>9s} {'flash us':>9s} {'TFLOP/s':>8s}"
          f" {'paged/flash':>11s}  best config")
    for name, us, err, fus, cfg, flops in rows:
        print(f"{name:36s} {us:9.1f} {flops / us / 1e6:8.1f} {err:9.2e} {fus:9.1f} {flops / fus / 1e6:8.1f}"
              f" {us / fus:11.2f}  {cfg or 'default'}")
