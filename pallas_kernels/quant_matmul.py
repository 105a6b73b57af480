"""Weight-only quantized matmul for skinny batches (decode): y = x @ dequantize(q, scale).

Backend: Pallas-Triton (CUDA and ROCm). The weight is dequantized in registers, so HBM traffic is
the packed weight plus its scales; x and y are tiny next to it. Accumulation is float32.

Weight layouts (`jllm/quant.py` quantizes into them; K = in, N = out, G = group_size):
  bits=8:  q int8 [K, N]; scale [K // G, N]. Per-output-channel int8 is G = K (scale [1, N]).
  bits=4:  q int8 [K // 2, N], two's-complement nibbles. Within group g, packed row g*G/2 + j
           holds row g*G + j in its low nibble and row g*G + G/2 + j in its high nibble, so a tile
           of packed rows reads two contiguous runs of x. scale [K // G, N].
  bits=16: q is a plain float weight [K, N] and scale is None (an unquantized GEMV).

Grid: (N blocks, K splits, M blocks). Each program walks its share of K in tiles of `block_k` rows;
a tile never straddles a scale group, so grouped scales apply once per tile. With k_splits > 1 the
programs write float32 partials [S, M, N] that XLA sums (or, with fused_reduce, the last split of
each output block to arrive sums them in split order); batch-1 GEMV over N = 4096 has too few N
blocks to fill 132 SMs otherwise. M == 1 uses a register FMA reduction (int8/int4 with an
inline-PTX step per 4 bytes; bf16 read as int32 words of 2 columns, a PTX step per column;
int4 with bf16/f16 x by default as integer dot products on int8 limbs of x, BlockSizes.idp4a);
larger M a tensor-core dot with M padded to 16. BlockSizes(mma=True) runs int4 at any M as a
tensor-core dot of the transposed problem, y^T = W^T x^T, on bf16 codes made by inline PTX.

With `norm` the kernel multiplies RMSNorm(x) instead of x: each program sums the squares of its
rows of x before its loop and normalizes every x tile as it loads it, so the norm before q/k/v and
before gate/up costs no kernel of its own.

`quant_matmul_multi` multiplies x by several weights (q/k/v, gate/up) in one launch: grid axis 0
runs over the N blocks of all of them and each program branches (statically unrolled) to its
weight's code, so each launch's fixed cost (launch, tail wave, split-K reduction) is paid once and
the split count comes from the total N blocks. `quant_matmul` is its one-weight case.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of one program. block_k counts logical input rows (two per byte for int4).

    k_splits=None picks enough splits to give the GPU about `target_programs` programs. fma=True
    runs M == 1 as a register FMA reduction instead of a padded tensor-core dot. `prefetch` tiles
    are in flight per program: the loads of tile i + prefetch - 1 are issued before tile i's math
    (register buffering; a GEMV is latency-bound without it). prefetch=1 leaves pipelining to
    Triton's `num_stages`, which only applies to loads that feed a dot. tf32_dot=True
    feeds the dot float32 tiles (tf32 is exact for the integer codes and for bf16 x) instead of
    casting them to x's dtype. asm=True runs the M == 1 int8/int4 inner step as inline PTX
    (`_ptx_dequant_fma`): about 3 instructions per weight instead of 7 (interpret mode, which
    cannot run PTX, uses the jnp formulation of the same arithmetic); and it reads an M == 1 bf16
    weight (N even) as int32 words of 2 adjacent columns, one PTX step per column
    (`_ptx_bf16_fma`; `bf16_half` in interpret mode): 3.04 against 2.77 TB/s per 7B layer on an
    H200, as fast as XLA's GEMV, where loading bf16 tiles cost unpacking and repacking
    instructions and registers. (int8/int4 read as words measured no faster end to end: their
    step is not bound by those instructions.) Programs number
    floor(target_programs / N blocks) * N blocks, so a grid never spills into a second, mostly
    empty wave. fused_reduce=True sums the K splits inside the kernel: the last split of each
    output block to finish (counted by an atomic) adds all partials in split order, deterministic
    and without a separate reduction kernel. It measured slower on the H100 (105.9 vs 98.7 us per
    int8 layer, 224.6 vs 260.4 tokens/s end to end: docs/perf_quant.md), so XLA sums by default.
    fold=True (int4 with group scales, asm): `_ptx_int4_folded`, 25 instructions per 8 codes
    instead of 33 (the int4 M == 1 default; docs/perf_quant.md). mma=True (int4, every N a
    multiple of 4; any M, used instead of fma): the weight is read as int32 words of 4 columns,
    `_ptx_int4_bf16` turns each word into bf16 codes (12 instructions per 8 codes) and a
    tensor-core dot of the transposed tile, [bn, bk] @ [bk, bm] (wgmma on Hopper, with the weight
    as the register operand), multiplies them; the group scale is applied to the float32 tile
    result. About 2.6 instructions per code in the sm_90 loop against 6.2 for fold
    (scripts/kernel_asm.py), yet slower on an H200: 97.8 against 72.4 us per 7B layer, 312.6
    against 414.1 tokens/s end to end (latency-bound: one tile in flight, a shared-memory round
    trip and a wgmma wait per tile; docs/perf_quant.md). Off by default.
    words=True (M == 1, every N a multiple of 4; int4 with group scales, int8 per channel): the
    weight is read as int32 words of 4 columns and each column is a PTX step of its own
    (`_ptx_int4_word_fold`, `_ptx_int8_word_fma`), with no byte unpacking around the PTX; the
    tile is `sub_tiles` sub-tiles loaded apart, so one accumulator per column serves the same
    element of each. Fewer instructions and registers, yet no faster on an H200 (int4 75.8-81.0
    against 72.1-75.6 us per 7B layer, int8 89.3-91.5 against 84.0-86.0; docs/PERFORMANCE.md,
    eighth round). Off by default. idp4a=True (int4 with group scales, bf16 or f16 x, M == 1):
    integer dot products (`_ptx_int4_idp4a`). Each program splits x into two int8 limbs per 8
    values, x = peak / 127 * (hi + lo / 254) (about 15 bits: the float path's result up to the
    output's rounding), loads 4 packed rows 4 apart as 4 sub-tiles, gathers one column's 4
    codes into a word and sums 8 codes with 4 DP4A and one float FMA; bf16 x, norm weight and
    scales are read as int32 pairs. 59.0 against 73.5 us per 7B layer, int4 decode 412.3 ->
    517.1 tokens/s (the int4 M == 1 default; float32 x takes the fold path).
    """
    block_n: int = 128
    block_k: int = 128
    block_m: int = 16
    k_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    fma: bool = True
    target_programs: int = 528
    prefetch: int = 2
    tf32_dot: bool = True
    asm: bool = True
    fused_reduce: bool = False
    fold: bool = False
    mma: bool = False
    words: bool = False
    sub_tiles: int = 1
    idp4a: bool = False

    def __post_init__(self):
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.block_m > 128:
            raise ValueError(f"{self.block_m=} must be <= 128")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"{self.k_splits=} must be >= 1 or None")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"{self.num_warps=} must be one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")
        if not 1 <= self.prefetch <= 4:
            raise ValueError(f"{self.prefetch=} must be 1 to 4")
        if self.target_programs < 1:
            raise ValueError(f"{self.target_programs=} must be >= 1")
        if self.sub_tiles < 1 or self.sub_tiles & (self.sub_tiles - 1):
            raise ValueError(f"{self.sub_tiles=} must be a power of two >= 1")
        if self.mma and self.block_k < 32:
            raise ValueError(f"{self.block_k=} must be >= 32 with mma (16 packed int4 rows)")


def default_block_sizes(m: int, k: int, n: int, bits: int) -> BlockSizes:
    """The tiling that measured best in our sweeps (docs/perf_quant.md, docs/PERFORMANCE.md)."""
    del k, n
    if m == 1 and bits == 4:  # 64 packed rows x 128 columns per tile, 2 tiles in flight; DP4A
        return BlockSizes(block_n=128, block_k=128, prefetch=2, fold=True, idp4a=True)
    if m == 1:  # 32 rows x 256 columns per tile, 2 tiles in flight
        return BlockSizes(block_n=256, block_k=32, prefetch=2)
    # Skinny GEMM: a bf16 tensor-core dot, pipelined by Triton (num_stages) rather than by hand.
    if m <= 64:
        return BlockSizes(block_n=128, block_k=128, block_m=16 if m <= 16 else 64, fma=False,
                          prefetch=1, num_stages=4, tf32_dot=False)
    # A prefill's GEMM (jllm.quant routes it here only up to MAX_PALLAS_M_*): 128 x 128 tiles,
    # two warp groups, each weight tile dequantized once per 128 rows of x. Not yet timed.
    return BlockSizes(block_n=128, block_k=128, block_m=128, fma=False, prefetch=1, num_warps=8,
                      num_stages=3, tf32_dot=False)


def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """int8 codes in [-8, 7], [K, N] -> packed int8 [K // 2, N] (layout: module docstring)."""
    k, n = q.shape
    g = q.reshape(k // group_size, 2, group_size // 2, n)  # [K/G, 2, G/2, N]: halves of each group
    lo, hi = g[:, 0], g[:, 1]
    packed = (lo & 0x0F) | (hi << 4)  # int8 arithmetic: hi's sign lands in bit 7
    return packed.reshape(k // 2, n)


def unpack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """Packed int8 [K // 2, N] -> int8 values [K, N] (inverse of `pack_int4`)."""
    kh, n = q.shape
    g = q.reshape(kh * 2 // group_size, 1, group_size // 2, n)  # [K/G, 1, G/2, N]
    lo = (g << 4) >> 4  # arithmetic shift sign-extends the low nibble
    hi = g >> 4
    return jnp.concatenate([lo, hi], axis=1).reshape(kh * 2, n)


# float32 with bits 0x4B000000 is 2**23, whose mantissa ulp is 1: OR-ing a biased code u < 2**23
# into it gives exactly 2**23 + u, and one subtraction recovers the code: integer ops plus one FADD
# per element instead of an int -> float conversion instruction.
_F32_TWO_23 = 0x4B000000


def _dequant_f32(w, bits: int) -> list:
    """Raw tile [bkq, bn] -> float32 tiles of codes: [w] for int8 and bf16, [low, high] for int4."""
    if bits == 16:
        return [w.astype(jnp.float32)]
    wi = w.astype(jnp.int32)  # sign-extended bytes
    if bits == 8:
        u = (wi & 0xFF) ^ (_F32_TWO_23 | 0x80)  # two's complement byte + 128, in the mantissa
        return [lax.bitcast_convert_type(u, jnp.float32) - float(2**23 + 128)]
    lo = (wi & 0x0F) ^ (_F32_TWO_23 | 0x08)  # nibble + 8 (flipping a nibble's sign bit adds 8)
    hi = ((wi >> 4) & 0x0F) ^ (_F32_TWO_23 | 0x08)
    return [lax.bitcast_convert_type(v, jnp.float32) - float(2**23 + 8) for v in (lo, hi)]


def _ptx_dequant_fma(bits: int, scaled: bool) -> tuple[str, str]:
    """Inline PTX for 4 packed bytes (4 adjacent columns of one packed row): acc[i] += the row's
    x times code(byte i) (int4: two codes per byte, two x values), times scale[i] if `scaled`.

    Operands ($n): outputs 0-3 (new acc), then the packed bytes, 4 x values per code half, 4 scales
    (if scaled), 4 old acc values. Codes become floats by the 2**23 trick of `_dequant_f32`: one
    XOR (int8) or AND+XOR (int4) per 4 bytes, then per code a PRMT (byte into the mantissa of
    2**23), a SUB and an FMA.
    """
    halves = 1 if bits == 8 else 2
    offset = "0f4B000080" if bits == 8 else "0f4B000008"  # 2**23 + 128 / + 8
    w = 4
    xs = [5 + 4 * h for h in range(halves)]
    sc = 5 + 4 * halves
    acc = sc + (4 if scaled else 0)
    lines = [".reg .b32 c<2>, m, mg;", ".reg .f32 v, t;", "mov.b32 mg, 0x4B000000;"]
    if bits == 8:
        lines.append(f"xor.b32 c0, ${w}, 0x80808080;")  # two's complement byte + 128
    else:
        lines += [f"and.b32 c0, ${w}, 0x0F0F0F0F;", "xor.b32 c0, c0, 0x08080808;",  # nibble + 8
                  f"shr.u32 c1, ${w}, 4;", "and.b32 c1, c1, 0x0F0F0F0F;", "xor.b32 c1, c1, 0x08080808;"]
    for i in range(4):
        for h in range(halves):
            lines += [f"prmt.b32 m, c{h}, mg, 0x754{i};",  # 0x4B0000XX: 2**23 + byte i
                      f"sub.f32 v, m, {offset};"]
            x = f"${xs[h] + i}"
            if h == 0 and (scaled or halves == 2):
                lines.append(f"mul.f32 t, {x}, v;")
            elif h == 0:
                lines.append(f"fma.rn.f32 ${i}, {x}, v, ${acc + i};")
            else:
                lines.append(f"fma.rn.f32 t, {x}, v, t;")
        if scaled:
            lines.append(f"fma.rn.f32 ${i}, t, ${sc + i}, ${acc + i};")
        elif halves == 2:
            lines.append(f"add.f32 ${i}, t, ${acc + i};")
    n_in = 1 + 4 * halves + (4 if scaled else 0) + 4
    constraints = ",".join(["=r"] * 4 + ["r"] * n_in)
    return "{\n" + "\n".join(lines) + "\n}", constraints


# 1 + u/128 for a nibble code u = c + 8 in [0, 16): the bits 0x3F80_0000 | u << 16, which one PRMT
# builds from the byte 0x80 | u and the constant 0x3F00_0000.
_F32_ONE_HI = 0x3F000000


def fold_operands(x_lo, x_hi):
    """x values of a packed int4 row's two codes -> (128 x_lo, 128 x_hi, -136 (x_lo + x_hi)): with
    v = 1 + (c + 8) / 128, x c = 128 x v - 136 x, so a row's two codes cost two FMAs from r."""
    return x_lo * 128.0, x_hi * 128.0, (x_lo + x_hi) * -136.0


def _ptx_int4_folded() -> tuple[str, str]:
    """Inline PTX for 4 packed int4 bytes (4 adjacent columns of one packed row) with group scales:
    acc[i] += scale[i] * (x_lo c_lo(byte i) + x_hi c_hi(byte i)), the x terms from `fold_operands`.

    Operands ($n): outputs 0-3, the packed bytes, 4 of 128 x_lo, 4 of 128 x_hi, 4 of r, 4 scales,
    4 old acc values. Per 4 bytes: AND, XOR, SHR, AND, XOR (each byte becomes 0x80 | u), then per
    code a PRMT (the float 1 + u/128) and an FMA, and per byte one FMA with its scale: 25
    instructions for 8 codes, where `_ptx_dequant_fma` spends 33 (its SUB per code and MUL per
    byte are gone)."""
    w, xl, xh, r, sc, acc = 4, 5, 9, 13, 17, 21
    lines = [".reg .b32 c<2>, m, mg;", ".reg .f32 t;", f"mov.b32 mg, 0x{_F32_ONE_HI:08X};",
             f"and.b32 c0, ${w}, 0x0F0F0F0F;", "xor.b32 c0, c0, 0x88888888;",  # 0x80 | (nibble + 8)
             f"shr.u32 c1, ${w}, 4;", "and.b32 c1, c1, 0x0F0F0F0F;", "xor.b32 c1, c1, 0x88888888;"]
    for i in range(4):
        sel = f"0x7{i}54"  # bytes: 0x00, 0x00, byte i of c, 0x3F
        lines += [f"prmt.b32 m, c0, mg, {sel};", f"fma.rn.f32 t, ${xl + i}, m, ${r + i};",
                  f"prmt.b32 m, c1, mg, {sel};", f"fma.rn.f32 t, ${xh + i}, m, t;",
                  f"fma.rn.f32 ${i}, t, ${sc + i}, ${acc + i};"]
    constraints = ",".join(["=r"] * 4 + ["r"] * 21)
    return "{\n" + "\n".join(lines) + "\n}", constraints


def int4_word_bytes(w):
    """int32 words of 4 packed int4 bytes -> (c_lo, c_hi): each byte of a word becomes 0x80 | u,
    u = code + 8, for the low and the high nibbles (the operands of `_ptx_int4_word_fold`)."""
    flip = jnp.int32(-0x77777778)  # 0x88888888: the float's high mantissa bit and the code's + 8
    return (w & 0x0F0F0F0F) ^ flip, ((w >> 4) & 0x0F0F0F0F) ^ flip


def int4_word_values(c, i: int):
    """A word from `int4_word_bytes` -> the float32 1 + u / 128 of its byte i (the jnp form of the
    PRMT in `_ptx_int4_word_fold`, for interpret mode)."""
    return lax.bitcast_convert_type(_F32_ONE_HI | (((c >> (8 * i)) & 0xFF) << 16), jnp.float32)


def _ptx_int4_word_fold(i: int, subs: int = 1) -> tuple[str, str]:
    """Inline PTX for column i (byte i) of a word of 4 packed int4 bytes, after `int4_word_bytes`:
    acc += scale * (x_lo c_lo + x_hi c_hi), the x terms from `fold_operands`. Operands: output 0,
    then c_lo, c_hi of each of `subs` words (the same column of `subs` packed rows), 128 x_lo,
    128 x_hi of each, r (summed over the words), the scale, the old acc, and the constant
    0x3F000000 loaded from memory: given as an immediate, ptxas puts the PRMT's other operand,
    the byte selector, in a register instead, and with registers short it re-creates that
    register before every PRMT (an extra instruction per code). A PRMT and an FMA per code and
    one FMA with the scale per `subs` words: (16 subs + 1) instructions per column and
    8 subs codes, plus the 4 of `int4_word_bytes` per word, shared by its 4 columns. The weight
    reaches the PTX as the loaded word: no byte unpacking and repacking around it
    (`_ptx_int4_folded` takes 4 separate bytes, which Triton unpacks from its vector loads with
    a PRMT each and packs again)."""
    sel = f"0x7{i}54"  # bytes: 0x00, 0x00, byte i of c, 0x3F
    n = 2 * subs  # codes per column: c operands $1..$n, x operands $n+1..$2n
    r, sc, acc, mg = 2 * n + 1, 2 * n + 2, 2 * n + 3, 2 * n + 4
    lines = [".reg .b32 m;", ".reg .f32 t;"]
    for j in range(n):
        lines += [f"prmt.b32 m, ${1 + j}, ${mg}, {sel};",
                  f"fma.rn.f32 t, ${n + 1 + j}, m, {'$' + str(r) if j == 0 else 't'};"]
    lines.append(f"fma.rn.f32 $0, t, ${sc}, ${acc};")
    return "{\n" + "\n".join(lines) + "\n}", "=r," + ",".join(["r"] * (mg))


def int8_word_values(w, i: int):
    """int32 words of 4 int8 codes (4 adjacent columns) -> the float32 codes of byte i, by the
    2**23 trick of `_dequant_f32` (the jnp form of `_ptx_int8_word_fma`, for interpret mode)."""
    u = ((w >> (8 * i)) & 0xFF) ^ (_F32_TWO_23 | 0x80)
    return lax.bitcast_convert_type(u, jnp.float32) - float(2**23 + 128)


def _ptx_int8_word_fma(i: int, subs: int = 1) -> tuple[str, str]:
    """Inline PTX for column i (byte i) of `subs` words of 4 int8 codes (the same column of
    `subs` rows), after each word's sign bits are flipped (w ^ 0x80808080: code + 128):
    acc += the sum of x * code. Operands: output 0, then the flipped words, their x, the old acc,
    and the constant 0x4B000000 loaded from memory (as in `_ptx_int4_word_fold`). A PRMT
    (2**23 + code + 128), a SUB and an FMA per code."""
    acc, mg = 2 * subs + 1, 2 * subs + 2
    lines = [".reg .b32 m;", ".reg .f32 v, t;"]
    for j in range(subs):
        dst = "$0" if j == subs - 1 else "t"
        lines += [f"prmt.b32 m, ${1 + j}, ${mg}, 0x765{i};", "sub.f32 v, m, 0f4B000080;",
                  f"fma.rn.f32 {dst}, ${1 + subs + j}, v, {'$' + str(acc) if j == 0 else 't'};"]
    return "{\n" + "\n".join(lines) + "\n}", "=r," + ",".join(["r"] * mg)


# idp4a: x = peak / 127 * (hi + lo / 254) in int8 limbs, codes as 16 c (a nibble in the high half
# of a byte is its value times 16): the DP4A sums 16 c hi and 16 c lo, and the float result is
# (254 * those + these) * peak / (127 * 16 * 254).
_IDP4A_SCALE = 1.0 / (127 * 16 * 254)
_F32_ROUND = "0f4B400000"  # 1.5 * 2**23: adding it rounds |v| < 2**22 to an integer in the low bits


def x_limb_values(x, inv):
    """float32 x [R] and 127 / peak [R] -> int32 (hi, lo): x * inv rounded, and the remainder
    times 254 rounded (the jnp form of `_ptx_x_limbs`, for interpret mode)."""
    a = x * inv
    hi = jnp.round(a)
    return hi.astype(jnp.int32), jnp.round((a - hi) * 254.0).astype(jnp.int32)


def _ptx_x_limbs(limb: int) -> tuple[str, str]:
    """Inline PTX: 4 float32 x values and 127 / peak -> one int32 word of their int8 limbs, x_s
    in byte s: limb 0 round(x * inv), limb 1 round(254 * (x * inv - round(x * inv))). Operands:
    output 0, x_0..x_3, inv. Each rounding is an FMA with 1.5 * 2**23 (the integer lands in the
    low byte) and PRMTs gather the 4 low bytes."""
    lines = [".reg .f32 a<4>, v, r, m;", ".reg .b32 t, u;", f"mov.f32 m, {_F32_ROUND};"]
    for j in range(4):
        lines.append(f"fma.rn.f32 a{j}, ${1 + j}, $5, m;")
        if limb:
            lines += [f"sub.f32 v, m, a{j};",  # -round(x * inv), exact
                      f"fma.rn.f32 r, ${1 + j}, $5, v;",  # the remainder, in [-0.5, 0.5]
                      f"fma.rn.f32 a{j}, r, 0f437E0000, m;"]  # 254 r, rounded
    lines += ["prmt.b32 t, a0, a1, 0x0040;", "prmt.b32 u, a2, a3, 0x0040;",
              "prmt.b32 $0, t, u, 0x5410;"]
    return "{\n" + "\n".join(lines) + "\n}", "=r,r,r,r,r,r"


def x_limbs_word(xs, inv, limb: int):
    """4 float32 x vectors [R] and inv [R] -> int32 [R] words of their int8 limbs (`_ptx_x_limbs`)."""
    code, constraints = _ptx_x_limbs(limb)
    return plgpu.elementwise_inline_asm(
        code, args=[*xs, inv], constraints=constraints, pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(xs[0].shape, jnp.int32)])[0]


def _ptx_int4_idp4a(i: int) -> tuple[str, str]:
    """Inline PTX for column i of 4 words of packed int4 bytes from 4 interleaved packed rows:
    acc += float(254 h + l) * scale, h and l the DP4A sums of the column's 8 codes (times 16)
    with x's int8 limbs. Operands: output 0, the 4 words, the limb words (hi limb of the group's
    low-code x, of its high-code x, then the lo limb of each), the scale, the old acc. Three
    PRMTs gather byte i of the 4 words, a shift and two ANDs leave each nibble times 16 in its
    byte, then 4 DP4A, a MAD, a CVT and an FMA: 14 instructions per 8 codes."""
    sel = f"0x{4 + i}{i}"  # byte i of the first word, then byte i of the second
    lines = [".reg .b32 a, b, t, lo, hi, h, l;", ".reg .f32 f;",
             f"prmt.b32 a, $1, $2, {sel};", f"prmt.b32 b, $3, $4, {sel};",
             "prmt.b32 t, a, b, 0x5410;",  # byte s: byte i of word s
             "shl.b32 lo, t, 4;", "and.b32 lo, lo, 0xF0F0F0F0;", "and.b32 hi, t, 0xF0F0F0F0;",
             "dp4a.s32.s32 h, lo, $5, 0;", "dp4a.s32.s32 h, hi, $6, h;",
             "dp4a.s32.s32 l, lo, $7, 0;", "dp4a.s32.s32 l, hi, $8, l;",
             "mad.lo.s32 h, h, 254, l;", "cvt.rn.f32.s32 f, h;",
             "fma.rn.f32 $0, f, $9, $10;"]
    return "{\n" + "\n".join(lines) + "\n}", "=r," + ",".join(["r"] * 10)


def bf16_half(w, half: int):
    """int32 words of 2 bf16 weights -> float32 weights of column `half` of each word (the jnp
    form of `_ptx_bf16_fma`, for interpret mode)."""
    return lax.bitcast_convert_type(w << 16 if half == 0 else w & -65536, jnp.float32)


def _ptx_bf16_fma(half: int) -> tuple[str, str]:
    """Inline PTX for half `half` of a word of 2 bf16 weights (2 adjacent columns of one row):
    acc += x * w. Operands: output 0, 1 the word, 2 x (float32), 3 the old acc. A bf16 is the top
    half of its float32, so the low half costs a shift and the high one an AND before the FMA."""
    get = "shl.b32 v, $1, 16;" if half == 0 else "and.b32 v, $1, 0xFFFF0000;"
    return "{\n.reg .b32 v;\n" + get + "\nfma.rn.f32 $0, $2, v, $3;\n}", "=r,r,r,r"


# bf16 with bits 0x4300 is 128, whose mantissa ulp is 1: OR-ing a nibble u < 16 into it gives
# exactly 128 + u. With u = code + 8 (the nibble's sign bit flipped), one packed FMA by 1 and -136
# leaves the code, exact in bf16.
_BF16_128 = 0x4300


def int4_words_bf16(w, half: int):
    """int32 words of 4 packed int4 bytes (4 adjacent columns) [R, C] -> bf16 codes [R, 4 C] of
    the low (half=0) or high (half=1) nibbles, in column order: the jnp form of `_ptx_int4_bf16`,
    for interpret mode, with the same arithmetic."""
    cols = []
    for i in range(4):  # byte i of each word: column 4 c + i
        u = ((w >> (8 * i + 4 * half)) & 0x0F) ^ (_BF16_128 | 0x08)  # 128 + code + 8, as bits
        v = lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.bfloat16)
        cols.append(v - jnp.asarray(136, jnp.bfloat16))  # exact: integers below 256
    r, c = w.shape
    return jnp.stack(cols, axis=-1).reshape(r, 4 * c)


def _ptx_int4_bf16(half: int) -> tuple[str, str]:
    """Inline PTX for one int32 word of 4 packed int4 bytes: the bf16 codes of its low (half=0)
    or high (half=1) nibbles. Operands: outputs 0 (bytes 0 and 1) and 1 (bytes 2 and 3), each 2
    bf16; then the word 4 times (the kernel hands it over once per output bf16). A PRMT orders
    the bytes 0, 2, 1, 3; per output a shift (but the first), one LOP3 ((t & 0x000F000F) ^
    0x43084308: both nibbles into bf16 128 + u, the sign bit flipped) and an FMA.bf16x2 (times 1,
    minus 136): 12 instructions per 8 codes, the PRMT shared by both halves."""
    lut = 0x6A  # (a & b) ^ c over a = 0xF0, b = 0xCC, c = 0xAA
    magic = (_BF16_128 | 0x08) * 0x10001
    lines = [".reg .b32 t, s, one, off;", "mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;",
             "prmt.b32 t, $2, $2, 0x3120;"]  # bytes 0, 2, 1, 3: pairs (0, 1) and (2, 3) 16 bits apart
    for out in range(2):
        shift = 8 * out + 4 * half
        src = "t"
        if shift:
            lines.append(f"shr.u32 s, t, {shift};")
            src = "s"
        lines += [f"lop3.b32 ${out}, {src}, 0x000F000F, 0x{magic:08X}, 0x{lut:02X};",
                  f"fma.rn.bf16x2 ${out}, ${out}, one, off;"]
    return "{\n" + "\n".join(lines) + "\n}", "=r,=r,r,r,r,r"


def _int4_codes(w, half: int, compiled: bool):
    """int32 words [bkq, bn / 4] -> bf16 codes [bkq, bn] of one nibble half: `_ptx_int4_bf16`
    compiled, `int4_words_bf16` in interpret mode."""
    if not compiled:
        return int4_words_bf16(w, half)
    r, c = w.shape
    w4 = jnp.stack([w, w], axis=-1)
    w4 = jnp.stack([w4, w4], axis=-1)  # [bkq, bn / 4, 2, 2]: one copy per output bf16
    code, constraints = _ptx_int4_bf16(half)
    out = plgpu.elementwise_inline_asm(
        code, args=[w4], constraints=constraints, pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(w4.shape, jnp.bfloat16)])[0]
    return out.reshape(r, 4 * c)  # the joined axes are in-thread: no data movement


def _quant_matmul_kernel(
    x_ref,  # [M, K]
    q_ref,  # [Kq, N]: Kq = K // 2 for int4, else K; with words, bf16 pairs as int32 [K, N // 2]
    #         or int4 words of 4 columns as int32 [K // 2, N // 4]; with mma, int4 words too
    s_ref,  # [K // G, N], or None for bits=16
    o_ref,  # [M, N] in x's dtype, or [S, M, Nc] float32 partials when split and not fused
    p_ref,  # fused split: [S, M, Nc] float32 partials, else None
    c_ref,  # fused split: [grid N blocks * M blocks] int32 arrival counts, zero on entry, else None
    *,
    pids: tuple,
    block0: int,
    col: int,
    bits: int,
    group_size: int,
    block_m: int,
    block_n: int,
    block_kq: int,
    tiles_per_split: int,
    fma: bool,
    split: bool,
    num_splits: int,
    prefetch: int,
    tf32_dot: bool,
    asm: bool,
    words: bool,
    fold: bool,
    mma: bool,
    sub_tiles: int,
    idp4a: bool,
    compiled: bool,  # not interpret mode: inline PTX, strided stores, barriers
    n_ref=None,  # [K] RMSNorm weight applied to x in the prologue, or None
    g_ref=None,  # int4 words, compiled: [1] int32 holding _F32_ONE_HI (see _ptx_int4_word_fold)
    xw_ref=None,  # idp4a with bf16 x and scales: x as int32 words of 2 [M, K // 2] (s_ref too)
    nw_ref=None,  # and the norm weight as words [K // 2], or None
    eps: float = 0.0,
):
    """One (N block, K split, M block) program of one weight; `pids` are its program ids. Grid axis
    0 counts the N blocks of every weight of the call; this weight's are block0, block0 + 1, ...
    The float32 partials are shared by the weights ([S, M, Nc], Nc = the sum of their N): this
    one's start at column `col`. With n_ref, every program first sums the squares of its whole
    rows of x (they are small and stay in L2), and each x tile is normalized as it is loaded.
    """
    m_size, k_size = x_ref.shape
    kq_size, n_size = q_ref.shape
    # words: a bf16 weight read as int32 words of 2 adjacent columns, or an int4 one as words of
    # 4 (4 packed bytes), each column a PTX step of its own (M == 1)
    # mma: int4 read as int32 words of 4 adjacent columns (4 packed bytes), for `_int4_codes`
    per_word = (2 if bits == 16 else 4) if words else 4 if mma else 1  # columns per element
    wn = block_n // per_word  # weight tile columns
    subs = min(sub_tiles, block_kq) if words and bits != 16 else 1  # sub-tiles of rs rows
    if idp4a:
        subs = 4  # a DP4A's 4 codes: one column of 4 interleaved packed rows
    rs = block_kq // subs
    n_size = n_size * per_word
    pid, pid_s, pid_m = pids
    pid_n = pid - block0 if block0 else pid  # this weight's N block
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    n_mask = (n0 + jnp.arange(block_n)) < n_size  # [bn]
    n_ragged = n_size % block_n != 0  # masks only where a block can run past N or K
    gq = group_size // 2 if bits == 4 else group_size  # packed rows per scale group
    per_group = bits != 16 and group_size < k_size  # else one scale row, applied at the end
    k_ragged = kq_size % block_kq != 0  # never when per_group: K % G == 0 and block_kq | gq
    n_tiles = pl.cdiv(kq_size, block_kq)
    t_start = pid_s * tiles_per_split
    t_count = jnp.minimum(tiles_per_split, n_tiles - t_start)
    m0 = pid_m * block_m
    m_mask = (m0 + jnp.arange(block_m)) < m_size  # [bm]
    cdtype = jnp.float32 if fma or tf32_dot else x_ref.dtype  # codes are exact in bf16 and f16

    def and_(a, b):
        return b if a is None else (a if b is None else a & b)

    magic = g_ref[0] if g_ref is not None else None

    def load_tile(t, valid):
        """Tile t: ([weight tiles], [x tiles], [norm weight tiles], scales or None), all raw;
        `valid` masks it off. With words, the tile is `subs` sub-tiles of rs rows, loaded apart
        (the same layout: a thread holds the same element of each) with their x in order
        (int4: the low and high halves of each sub-tile in turn)."""
        p0 = pl.multiple_of(t * block_kq, block_kq)
        w_cols = (n0 // per_word + jnp.arange(wn)) * per_word < n_size if per_word > 1 else n_mask
        c0 = pl.multiple_of(pid_n * wn, wn) if per_word > 1 else n0  # first weight column (word)
        ws, xs, nws = [], [], []
        if idp4a:  # sub-tile s: packed rows p0 + s + 4 r, r < rs (never ragged: K % G == 0)
            w_mask = and_(w_cols[None, :] if n_ragged else None, valid)
            kw = {} if w_mask is None else dict(mask=w_mask, other=0)
            ws = interleaved(lambda rows: plgpu.load(q_ref.at[rows, pl.ds(c0, wn)], **kw,
                                                     eviction_policy="evict_first"), p0, axis=0)
            kl = p0 + (p0 // gq) * gq  # the x of the group's low codes; its high ones are gq on
            kw = {} if valid is None else dict(mask=valid, other=0)
            for k0 in (kl, kl + gq):
                if xw_ref is None:
                    xs += interleaved(lambda cols: plgpu.load(x_ref.at[m0, cols], **kw), k0)
                    if n_ref is not None:
                        nws += interleaved(lambda cols: plgpu.load(n_ref.at[cols], **kw), k0)
                    continue
                # bf16 pairs: word t of a row holds the x of sub-tiles 2 t and 2 t + 1
                for at, out in ((lambda c: xw_ref.at[m0, c], xs), (lambda c: nw_ref.at[c], nws)):
                    if out is nws and nw_ref is None:
                        continue
                    for w2 in interleaved(lambda cols: plgpu.load(at(cols), **kw), k0 // 2, n=2):
                        out += [bf16_half(w2, h) if n_ref is None  # float32 already
                                else bf16_half(w2, h).astype(x_ref.dtype) for h in (0, 1)]
        for sub in range(0 if idp4a else subs):
            ps = p0 + sub * rs if sub else p0
            rows = (ps + jnp.arange(rs)) < kq_size if k_ragged else None  # [rs]
            w_mask = and_(w_cols[None, :] if n_ragged else None,
                          None if rows is None else rows[:, None])
            w_mask = and_(w_mask, valid)
            ws.append(plgpu.load(q_ref.at[pl.ds(ps, rs), pl.ds(c0, wn)],
                                 **({} if w_mask is None else dict(mask=w_mask, other=0)),
                                 eviction_policy="evict_first"))  # [rs, wn]
            k_offsets = [ps] if bits != 4 else [ps + (ps // gq) * gq, ps + (ps // gq) * gq + gq]
            for k0 in k_offsets:  # int4: the group's first and second half of x
                if fma:
                    mask = and_(rows, valid)
                    ref = x_ref.at[m0, pl.ds(k0, rs)]  # [rs]
                else:
                    mask = and_(and_(m_mask[:, None], None if rows is None else rows[None, :]), valid)
                    ref = x_ref.at[pl.ds(m0, block_m), pl.ds(k0, rs)]  # [bm, rs]
                xs.append(plgpu.load(ref, **({} if mask is None else dict(mask=mask, other=0))))
                if n_ref is not None:  # the norm weight of these rows of x
                    mask = and_(rows, valid)
                    nws.append(plgpu.load(n_ref.at[pl.ds(k0, rs)],
                                          **({} if mask is None else dict(mask=mask, other=0))))
        if not per_group:
            scale = None
        elif xw_ref is not None:  # bf16 pairs: word t of each 4 columns holds 2 t and 2 t + 1
            cmask = (n0 + per_word * jnp.arange(wn)) < n_size
            scale = []
            for w2 in interleaved(lambda cols: plgpu.load(
                    s_ref.at[p0 // gq, cols], **mask_kw(cols, cmask, valid)), 2 * c0, n=2, size=wn):
                scale += [bf16_half(w2, h) for h in (0, 1)]
        elif words and compiled:  # one [bn / 4] row of scales per column of a word
            scale = [load_scale(p0 // gq, valid, i) for i in range(per_word)]
        elif words:  # interpret mode has no strided loads: the same rows from one [bn] load
            row = load_scale(p0 // gq, valid).reshape(wn, per_word)
            scale = [row[:, i] for i in range(per_word)]
        else:
            scale = load_scale(p0 // gq, valid)
        return ws, xs, nws, scale

    def interleaved(load, start, axis=-1, n=None, size=None):
        """The n (default subs) interleaved slices [start + s + n r for r < size (default rs)]
        along `axis` of what load(index) reads: strided loads compiled; one contiguous load split
        in interpret mode, which has no strided loads."""
        n, size = n or subs, size or rs
        if compiled:
            return [load(pl.ds(start + s, size, n)) for s in range(n)]
        v = load(pl.ds(start, size * n))
        v = v.reshape(size, n, *v.shape[1:]) if axis == 0 else v.reshape(size, n)
        return [v[:, s] for s in range(n)]

    def normed(xk, nw):
        """x tile -> RMSNorm(x) tile, rounded as the model's norm is: x * inv_rms in float32,
        to x's dtype, times the norm weight in x's dtype."""
        inv_b = inv_rms if fma else inv_rms[:, None]
        nw_b = nw if fma else nw[None, :]
        return (xk.astype(jnp.float32) * inv_b).astype(xk.dtype) * nw_b

    def row_inv_rms():
        """1 / sqrt(mean(x^2) + eps) of this program's rows of x: a scalar (fma) or [bm]. The
        squares are summed elementwise over chunks (one chunk for a 7B row at M == 1, 32
        registers a thread) and reduced once, so the prologue costs about one L2 round trip."""
        chunk = min(pl.next_power_of_2(k_size), 4096 if fma else max(128, 8192 // block_m))

        def body(c, acc):
            k0 = pl.multiple_of(c * chunk, chunk)
            cols = (k0 + jnp.arange(chunk)) < k_size if k_size % chunk else None
            if fma:
                ref, mask = x_ref.at[m0, pl.ds(k0, chunk)], cols
            else:
                ref = x_ref.at[pl.ds(m0, block_m), pl.ds(k0, chunk)]
                mask = and_(m_mask[:, None], None if cols is None else cols[None, :])
            v = plgpu.load(ref, **({} if mask is None else dict(mask=mask, other=0))).astype(jnp.float32)
            return acc + v * v

        zero = jnp.zeros((chunk,) if fma else (block_m, chunk), jnp.float32)
        total = jnp.sum(lax.fori_loop(0, pl.cdiv(k_size, chunk), body, zero), axis=-1)
        return lax.rsqrt(total / k_size + eps)

    def mask_kw(cols, cmask, valid):
        """Load keywords for `cols` (a strided slice compiled, else the contiguous pairs) of
        word columns masked by cmask [wn] where the block is ragged, and by `valid`."""
        if n_ragged and not compiled:
            cmask = jnp.repeat(cmask, 2)
        mask = and_(cmask if n_ragged else None, valid)
        return {} if mask is None else dict(mask=mask, other=0)

    def load_scale(row, valid=None, column=None):
        """The scales of row `row`: [bn], or with `column` i those of columns n0 + i + 4 j."""
        if column is None:
            cols, cmask = pl.ds(n0, block_n), n_mask
        else:
            cols = pl.ds(n0 + column, wn, per_word)
            cmask = (n0 + column + per_word * jnp.arange(wn)) < n_size
        mask = and_(cmask if n_ragged else None, valid)
        return plgpu.load(s_ref.at[row, cols], **({} if mask is None else dict(mask=mask, other=0)))

    def idp4a_step(acc, ws, xs, scale):
        """int4 words by integer dot products (`_ptx_int4_idp4a`): x in two int8 limbs per 8
        values (`x_limbs`), the codes of 4 interleaved rows transposed into one word per
        column, 4 DP4A and one float FMA per column and 8 codes."""
        xs = [xk.astype(jnp.float32) for xk in xs]  # [lo of sub-tiles 0-3, hi of sub-tiles 0-3]
        peak = functools.reduce(jnp.maximum, [jnp.abs(xk) for xk in xs])  # [rs]
        peak = jnp.maximum(peak, jnp.float32(1e-30))
        inv = jnp.float32(127.0) / peak
        sx = peak * jnp.float32(_IDP4A_SCALE)  # [rs]: x = sx * 16 * (254 hi + lo) / 16
        shape = (rs, wn)
        bcast = lambda v: jnp.broadcast_to(v[:, None], shape)  # noqa: E731
        out = []
        if compiled:
            limbs = [x_limbs_word(xs[h * subs:(h + 1) * subs], inv, limb)
                     for limb in (0, 1) for h in (0, 1)]  # hi-limb lo, hi-limb hi, lo-limb lo, lo-limb hi
            for i in range(per_word):
                se = bcast(sx) * jnp.broadcast_to(scale[i].astype(jnp.float32)[None, :], shape)
                code, constraints = _ptx_int4_idp4a(i)
                out.append(plgpu.elementwise_inline_asm(
                    code, args=[*ws, *map(bcast, limbs), se, acc[i]], constraints=constraints,
                    pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0])
            return tuple(out)
        # Interpret mode: the same integers in a few whole-tile ops (nibble 2 i + h of a word is
        # column i's code of half h). Many small ops would make the interpreted kernel slow to build.
        hi, lo = x_limb_values(jnp.stack(xs).reshape(2, subs, rs), inv)  # [half, sub-tile, rs]
        limbs = jnp.moveaxis(254 * hi + lo, 0, -1)[:, :, None, None, :]  # [subs, rs, 1, 1, 2]
        nib = 4 * jnp.arange(2 * per_word, dtype=jnp.int32)
        codes = (jnp.stack(ws)[..., None] << (28 - nib)) >> 28  # [subs, rs, wn, 8] sign-extended
        codes = codes.reshape(subs, rs, wn, per_word, 2)
        total = (16 * codes * limbs).sum(axis=(0, 4)).astype(jnp.float32)  # [rs, wn, 4]
        return tuple(acc[i] + total[..., i] * (bcast(sx) * scale[i].astype(jnp.float32)[None, :])
                     for i in range(per_word))

    def compute(acc, tile):
        ws, xs, nws, scale = tile
        w = ws[0]
        if nws:
            xs = [normed(xk, nw) for xk, nw in zip(xs, nws)]
        if idp4a:
            return idp4a_step(acc, ws, xs, scale)
        if words and bits != 16:  # per column of each word, over the words of the sub-tiles
            shape = (rs, wn)
            bcast = lambda v: jnp.broadcast_to(v[:, None], shape)  # noqa: E731
            xs = [xk.astype(jnp.float32) for xk in xs]
            if bits == 8:  # acc += x * code (scaled at the end)
                cs = [c ^ jnp.int32(-0x7F7F7F80) for c in ws]  # 0x80808080: each code + 128
                args, rest = [*cs, *map(bcast, xs)], []
            else:  # scale * (sum of 128 x_lo v_lo + 128 x_hi v_hi + r) (`fold_operands`)
                cs = [c for w_s in ws for c in int4_word_bytes(w_s)]
                terms = [fold_operands(*xs[2 * j:2 * j + 2]) for j in range(subs)]
                r = functools.reduce(lambda a, b: a + b, [t[2] for t in terms])
                args = [*cs, *(bcast(v) for t in terms for v in t[:2]), bcast(r)]
            out = []
            for i in range(per_word):
                rest = [] if bits == 8 else [jnp.broadcast_to(scale[i].astype(jnp.float32)[None, :], shape)]
                if compiled:
                    code, constraints = (_ptx_int8_word_fma(i, subs) if bits == 8
                                         else _ptx_int4_word_fold(i, subs))
                    out.append(plgpu.elementwise_inline_asm(
                        code, args=[*args, *rest, acc[i], jnp.broadcast_to(magic, shape)],
                        constraints=constraints, pack=1,
                        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0])
                elif bits == 8:  # interpret mode: the same arithmetic in jnp, on the same words
                    t = acc[i]
                    for w_s, xb in zip(ws, args[subs:]):
                        t = t + xb * int8_word_values(w_s, i)
                    out.append(t)
                else:
                    t = args[-1]
                    for j in range(subs):
                        lo, hi = (int4_word_values(c, i) for c in cs[2 * j:2 * j + 2])
                        t = t + args[2 * subs + 2 * j] * lo + args[2 * subs + 2 * j + 1] * hi
                    out.append(acc[i] + t * rest[0])
            return tuple(out)
        if words:  # one step per column of each word: acc holds one [bkq, wn] tile per column
            shape = (block_kq, wn)
            xb = jnp.broadcast_to(xs[0].astype(jnp.float32)[:, None], shape)
            if not compiled:  # interpret mode: the same arithmetic in jnp, on the same words
                return tuple(acc[i] + xb * bf16_half(w, i) for i in range(2))
            return tuple(plgpu.elementwise_inline_asm(
                _ptx_bf16_fma(i)[0], args=[w, xb, acc[i]], constraints=_ptx_bf16_fma(i)[1],
                pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]
                for i in range(2))
        if asm and fold and scale is not None:
            code, constraints = _ptx_int4_folded()
            shape = (block_kq, block_n)
            terms = fold_operands(*(xk.astype(jnp.float32) for xk in xs))
            args = [w, *(jnp.broadcast_to(v[:, None], shape) for v in terms),
                    jnp.broadcast_to(scale.astype(jnp.float32)[None, :], shape)]
            return plgpu.elementwise_inline_asm(
                code, args=[*args, acc], constraints=constraints, pack=4,
                result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]
        if asm:
            code, constraints = _ptx_dequant_fma(bits, scale is not None)
            shape = (block_kq, block_n)
            args = [w, *(jnp.broadcast_to(xk.astype(jnp.float32)[:, None], shape) for xk in xs)]
            if scale is not None:
                args.append(jnp.broadcast_to(scale.astype(jnp.float32)[None, :], shape))
            return plgpu.elementwise_inline_asm(
                code, args=[*args, acc], constraints=constraints, pack=4,
                result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]
        if mma:  # y^T = W^T x^T: the weight tile is the dot's first operand, [bn, bkq]
            t = None
            for half, xk in enumerate(xs):
                codes = _int4_codes(w, half, compiled)  # [bkq, bn] bf16
                if x_ref.dtype != jnp.bfloat16:
                    codes = codes.astype(x_ref.dtype)  # exact: small integers
                part = lax.dot_general(  # [bn, bm]
                    codes, xk, (((0,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None)
                t = part if t is None else t + part
            return acc + (t if scale is None else t * scale.astype(jnp.float32)[:, None])
        t = None
        for xk, wk in zip(xs, _dequant_f32(w, bits)):
            if fma:
                part = xk.astype(jnp.float32)[:, None] * wk  # [bkq, bn]
            else:
                # float32 x: IEEE float32 products (Triton would round the inputs to tf32 by
                # default); bf16 x in tf32 tiles (tf32_dot) is exact either way.
                part = jnp.dot(xk.astype(cdtype), wk.astype(cdtype), preferred_element_type=jnp.float32,
                               precision=lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None)
            t = part if t is None else t + part
        if scale is not None:
            t = t * scale.astype(jnp.float32)[None, :]
        return acc + t

    acc_shape = (block_kq, block_n) if fma else (block_n, block_m) if mma else (block_m, block_n)
    acc = (tuple(jnp.zeros((rs, wn), jnp.float32) for _ in range(per_word)) if words
           else jnp.zeros(acc_shape, jnp.float32))
    if prefetch > 1:
        def body(i, carry):
            acc, tiles = carry
            ahead = i + prefetch - 1
            nxt = load_tile(t_start + ahead, ahead < t_count)
            return compute(acc, tiles[0]), (*tiles[1:], nxt)

        tiles = tuple(load_tile(t_start + j, j < t_count) for j in range(prefetch - 1))
        # the norm's sum of squares after the first weight loads are issued: it runs while they fly
        inv_rms = row_inv_rms() if n_ref is not None else None
        acc, _ = lax.fori_loop(0, t_count, body, (acc, tiles))
    else:
        inv_rms = row_inv_rms() if n_ref is not None else None
        acc = lax.fori_loop(0, t_count, lambda i, acc: compute(acc, load_tile(t_start + i, None)),
                            acc)
    if mma:
        acc = acc.T  # [bm, bn]
    # The result as pieces (first column, column stride, value): one [bm, bn] (or [bn] when fma)
    # block, or with words one [bn / per_word] piece per column of a word, at n0 + i + per_word j.
    if words:
        vals = [a.sum(axis=0) for a in acc]  # the one cross-thread reduction per piece
        if bits == 8:  # one scale row (per output channel), per column of a word
            if compiled:
                vals = [v * load_scale(jnp.int32(0), None, i).astype(jnp.float32)
                        for i, v in enumerate(vals)]
            else:  # interpret mode has no strided loads
                row = load_scale(jnp.int32(0)).astype(jnp.float32).reshape(wn, per_word)
                vals = [v * row[:, i] for i, v in enumerate(vals)]
        pieces = ([(n0 + i, per_word, v) for i, v in enumerate(vals)] if compiled  # strided stores
                  else [(n0, 1, jnp.stack(vals, axis=1).reshape(block_n))])  # interpret mode
    else:
        if fma:
            acc = acc.sum(axis=0, keepdims=True)  # [1, bn]: the one cross-thread reduction
        if bits != 16 and not per_group:
            acc = acc * load_scale(jnp.int32(0)).astype(jnp.float32)[None, :]
        pieces = [(n0, 1, acc[0] if fma else acc)]
    stores = []  # (output index, partials index, value, mask)
    for start, stride, val in pieces:
        size = block_n // stride
        cmask = (start + stride * jnp.arange(size)) < n_size  # [size]
        cols = pl.ds(start, size, stride if stride > 1 else None)
        pcols = pl.ds(start + col if col else start, size, stride if stride > 1 else None)
        if fma:
            stores.append(((m0, cols), (m0, pcols), val, dict(mask=cmask) if n_ragged else {}))
        else:
            stores.append(((pl.ds(m0, block_m), cols), (pl.ds(m0, block_m), pcols), val,
                           dict(mask=m_mask[:, None] & cmask[None, :])))
    if not split:
        for idx, _, val, mask in stores:
            plgpu.store(o_ref.at[idx], val.astype(o_ref.dtype), **mask)
    elif p_ref is None:  # XLA sums the partials
        for _, pidx, val, mask in stores:
            plgpu.store(o_ref.at[(pid_s, *pidx)], val, **mask)
    else:
        for _, pidx, val, mask in stores:
            plgpu.store(p_ref.at[(pid_s, *pidx)], val, **mask)
        if compiled:  # every thread's partial is stored before the count is released
            plgpu.debug_barrier()
        # acquire-release at GPU scope: the last to arrive sees every other split's partial
        arrived = plgpu.atomic_add(c_ref, (pid * pl.num_programs(2) + pid_m,), jnp.int32(1))

        @pl.when(arrived == num_splits - 1)
        def _():  # the last split of this block: add every split's partial, in split order
            for idx, pidx, val, mask in stores:
                total = lax.fori_loop(
                    0, num_splits,
                    lambda j, t, pidx=pidx, mask=mask: t + plgpu.load(
                        p_ref.at[(j, *pidx)], **mask, **(dict(other=0.0) if mask else {})),
                    jnp.zeros(val.shape, jnp.float32))
                plgpu.store(o_ref.at[idx], total.astype(o_ref.dtype), **mask)


def _check_norm(x, norm):
    if norm is not None and (norm.shape != (x.shape[-1],) or norm.dtype != x.dtype):
        raise ValueError(f"norm must be [{x.shape[-1]}] {x.dtype} like x's rows, got {norm.shape} {norm.dtype}")


def _check_args(x, q, scale, bits, group_size):
    if x.ndim != 2 or q.ndim != 2:
        raise ValueError(f"x [M, K] and q [Kq, N] must be 2-D, got {x.shape=} {q.shape=}")
    m, k = x.shape
    if bits not in (4, 8, 16):
        raise ValueError(f"{bits=} must be 4, 8 or 16")
    kq = k // 2 if bits == 4 else k
    if q.shape[0] != kq or (bits == 4 and k % 2):
        raise ValueError(f"{q.shape=} does not match {x.shape=} for {bits=}")
    if bits == 16:
        if scale is not None:
            raise ValueError("bits=16 takes scale=None")
        return
    if group_size < 1 or k % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"{group_size=} must divide {k=} (and be even for int4)")
    if scale is None or scale.shape != (k // group_size, q.shape[1]):
        raise ValueError(f"scale must be [{k // group_size}, {q.shape[1]}], got "
                         f"{None if scale is None else scale.shape}")


def _check_weights(x, weights, bits, group_size) -> list:
    """`_check_args` for every (q, scale), naming the weight that fails; all must share dtypes."""
    weights = [tuple(w) for w in weights]
    if not weights or any(len(w) != 2 for w in weights):
        raise ValueError(f"weights must be a non-empty sequence of (q, scale) pairs, got "
                         f"{len(weights)} entries of lengths {[len(w) for w in weights]}")
    q0, s0 = weights[0]
    for i, (q, scale) in enumerate(weights):
        what = f"weights[{i}] (q {q.shape} {q.dtype}, scale " + (
            "None)" if scale is None else f"{scale.shape} {scale.dtype})")
        try:
            _check_args(x, q, scale, bits, group_size)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if q.dtype != q0.dtype or (scale is not None and scale.dtype != s0.dtype):
            raise ValueError(f"{what}: dtypes differ from weights[0] (q {q0.dtype}, scale "
                             f"{None if s0 is None else s0.dtype}); one kernel takes one set")
    return weights


def _quant_matmul(x, weights, *, bits, group_size, block_sizes, interpret, norm=None, eps=0.0):
    """x [M, K] @ each (q, scale) of `weights` in one pallas_call -> tuple of [M, N_i] (checked).
    norm [K] (or None): the rows of x are RMS-normalized with it first, inside the kernel.

    Grid axis 0 runs over the N blocks of all weights, in order; each program picks its weight by a
    static branch on that index, so the weights are read in place (never concatenated) and the
    launch fills one wave with all of them. The K-split partials of all weights share one
    [S, M, sum N_i] buffer, summed by one XLA reduction. One weight is plain `quant_matmul`.
    """
    m, k = x.shape
    kq = weights[0][0].shape[0]
    ns = [q.shape[1] for q, _ in weights]
    bs = block_sizes or default_block_sizes(m, k, sum(ns), bits)
    # mma: int4 read as int32 words of 4 columns (a bitcast, no copy), so every N is a multiple of 4
    mma = bs.mma and bits == 4 and all(n % 4 == 0 for n in ns)
    fma = bs.fma and m == 1 and not mma
    block_k = bs.block_k
    if bits != 16 and group_size < k:
        block_k = min(block_k, group_size)  # a tile stays inside one scale group
    block_kq = block_k // 2 if bits == 4 else block_k
    if not fma and block_kq < 16:
        raise ValueError(f"{block_k=} gives {block_kq} packed rows; the dot path needs >= 16")
    block_m = 1 if fma else max(16, min(bs.block_m, pl.next_power_of_2(m)))
    grid_ns = [pl.cdiv(n, bs.block_n) for n in ns]  # N blocks per weight
    grid_n, grid_m = sum(grid_ns), pl.cdiv(m, block_m)
    block0s = [sum(grid_ns[:i]) for i in range(len(ns))]  # each weight's first block on axis 0
    cols = [sum(ns[:i]) for i in range(len(ns))]  # each weight's first column in the partials
    n_tiles = pl.cdiv(kq, block_kq)
    splits = bs.k_splits or max(1, min(bs.target_programs // (grid_n * grid_m), n_tiles // 4))
    tiles_per_split = pl.cdiv(n_tiles, min(splits, n_tiles))
    splits = pl.cdiv(n_tiles, tiles_per_split)  # no empty splits
    split = splits > 1
    fused = split and bs.fused_reduce
    # an M == 1 bf16 weight is read as int32 words of 2 adjacent columns (a bitcast, no copy);
    # with BlockSizes.words, an int4 one with group scales or an int8 one with per-channel scales
    # as words of 4
    words = (bs.asm and fma and bits == 16 and weights[0][0].dtype == jnp.bfloat16
             and bs.block_n % 2 == 0 and all(n % 2 == 0 for n in ns))
    fits4 = bs.block_n % 4 == 0 and all(n % 4 == 0 for n in ns)
    # idp4a: int4 words by integer dot products; needs a 16-bit float x and whole 4-row sub-tiles
    idp4a = (bs.idp4a and fma and bits == 4 and group_size < k and fits4
             and x.dtype in (jnp.bfloat16, jnp.float16) and block_kq % 4 == 0)
    words4 = idp4a or (bs.words and fma and fits4 and (
        (bits == 4 and group_size < k) or (bits == 8 and group_size == k)))
    words = words or words4
    if words or mma:
        per = 2 if bits == 16 else 4
        weights = [(lax.bitcast_convert_type(q.reshape(kq, q.shape[1] // per, per), jnp.int32), s)
                   for q, s in weights]
    kernel = functools.partial(
        _quant_matmul_kernel, bits=bits, group_size=group_size, block_m=block_m,
        block_n=bs.block_n, block_kq=block_kq, tiles_per_split=tiles_per_split, fma=fma,
        split=split, num_splits=splits, prefetch=bs.prefetch,
        tf32_dot=bs.tf32_dot and bits != 16,
        asm=bs.asm and fma and bits in (4, 8) and not interpret and bs.block_n % 4 == 0,
        words=words, fold=bs.fold and bits == 4, mma=mma, sub_tiles=bs.sub_tiles, idp4a=idp4a,
        compiled=not interpret, eps=eps)
    per_weight = 1 if bits == 16 else 2  # refs per weight: q, and scale unless bits=16
    normed = norm is not None
    # idp4a with bf16 x and scales: x, the norm weight and the scales also as int32 words of 2
    pairs = idp4a and x.dtype == jnp.bfloat16 and all(s.dtype == jnp.bfloat16 for _, s in weights)

    def as_words(a):  # [..., 2 n] 16-bit -> [..., n] int32 (a bitcast, no copy)
        return lax.bitcast_convert_type(a.reshape(*a.shape[:-1], a.shape[-1] // 2, 2), jnp.int32)

    extra = []
    if pairs:
        weights = [(q, as_words(s)) for q, s in weights]
        extra = [as_words(x)] + ([as_words(norm)] if norm is not None else [])
    magic = words4 and not idp4a and not interpret  # the word steps' PRMT constant, as data
    magic_value = _F32_ONE_HI if bits == 4 else _F32_TWO_23
    args = ([x] + ([norm] if normed else []) + ([jnp.full((1,), magic_value, jnp.int32)] if magic else [])
            + extra
            + [a for w in weights for a in w[:per_weight]])
    partials = jax.ShapeDtypeStruct((splits, m, sum(ns)), jnp.float32)
    out_shape = ([partials] if split and not fused
                 else [jax.ShapeDtypeStruct((m, n), x.dtype) for n in ns])
    aliases = {}
    if fused:
        out_shape += [partials, jax.ShapeDtypeStruct((grid_n * grid_m,), jnp.int32)]
        # the counts start at zero (a memset) and are updated in place
        aliases = {len(args): len(out_shape) - 1}
        args.append(jnp.zeros((grid_n * grid_m,), jnp.int32))

    def body(x_ref, *refs):
        n_ref, refs = (refs[0], refs[1:]) if normed else (None, refs)
        g_ref, refs = (refs[0], refs[1:]) if magic else (None, refs)
        xw_ref, nw_ref = None, None
        if pairs:
            xw_ref, refs = refs[0], refs[1:]
            nw_ref, refs = (refs[0], refs[1:]) if normed else (None, refs)
        w_refs = [(*refs[i * per_weight:(i + 1) * per_weight], None)[:2] for i in range(len(ns))]
        outs = refs[len(ns) * per_weight + fused:]  # past the count input, aliased to its output
        p_ref, c_ref = outs[-2:] if fused else (None, None)

        # read outside the branches: interpret mode has no program ids inside a cond
        pids = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        def run(i):
            o_ref = outs[0] if split and not fused else outs[i]
            kernel(x_ref, *w_refs[i], o_ref, p_ref, c_ref, pids=pids, block0=block0s[i],
                   col=cols[i], n_ref=n_ref, g_ref=g_ref, xw_ref=xw_ref, nw_ref=nw_ref)

        if len(ns) == 1:
            return run(0)
        for i in range(len(ns)):  # unrolled: each weight's code is specialised to its shapes
            pl.when((pids[0] >= block0s[i]) & (pids[0] < block0s[i] + grid_ns[i]))(
                functools.partial(run, i))

    with _triton.quiet():
        outs = pl.pallas_call(
            body,
            grid=(grid_n, splits, grid_m),
            out_shape=out_shape,
            input_output_aliases=aliases,
            compiler_params=_triton.compiler_params(bs.num_warps, bs.num_stages),
            interpret=interpret,
            name=f"quant_matmul_int{bits}" + (f"_x{len(ns)}" if len(ns) > 1 else ""),
        )(*args)
    if not split or fused:
        return tuple(outs[:len(ns)])
    y = outs[0].sum(axis=0).astype(x.dtype)  # [M, sum N_i]: one reduction for all weights
    if len(ns) == 1:
        return (y,)
    return tuple(lax.slice_in_dim(y, c, c + n, axis=1) for c, n in zip(cols, ns))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes", "interpret", "eps"))
def quant_matmul(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    norm: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """x [M, K] @ dequantize(q [Kq, N], scale [K // G, N]) -> [M, N] in x's dtype.

    norm [K] in x's dtype: multiply RMSNorm(x) instead (x / sqrt(mean(x^2) + eps) * norm, rounded
    to x's dtype before the weight as `quant_matmul_ref` does), computed in the kernel's prologue.
    """
    _check_args(x, q, scale, bits, group_size)
    _check_norm(x, norm)
    return _quant_matmul(x, [(q, scale)], bits=bits, group_size=group_size,
                         block_sizes=block_sizes, interpret=interpret, norm=norm, eps=eps)[0]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes", "interpret", "eps"))
def quant_matmul_multi(
    x: jax.Array,
    weights: Sequence[tuple[jax.Array, jax.Array | None]],
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    norm: jax.Array | None = None,
    eps: float = 1e-6,
) -> tuple[jax.Array, ...]:
    """x [M, K] @ dequantize(q_i [Kq, N_i], scale_i [K // G, N_i]) for each weight, in one kernel
    launch -> tuple of [M, N_i] in x's dtype (e.g. q, k, v or gate, up from the same x).

    The weights share K, bits, group_size and dtypes; N_i may differ. block_sizes=None takes
    `default_block_sizes` with N = sum N_i, and the K splits are chosen from the total N blocks.
    norm, eps: as in `quant_matmul` (the RMSNorm before attention or the feed-forward block).
    """
    weights = _check_weights(x, weights, bits, group_size)
    _check_norm(x, norm)
    return _quant_matmul(x, weights, bits=bits, group_size=group_size, block_sizes=block_sizes,
                         interpret=interpret, norm=norm, eps=eps)


def quant_matmul_ref(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    norm: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Pure-jnp float32 reference: x [M, K] (RMS-normalized with norm, if given) @ dequantize(q,
    scale) -> [M, N] in x's dtype."""
    del block_sizes, interpret
    _check_args(x, q, scale, bits, group_size)
    _check_norm(x, norm)
    if norm is not None:
        x32 = x.astype(jnp.float32)
        x = (x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype) * norm
    w = (unpack_int4(q, group_size) if bits == 4 else q).astype(jnp.float32)  # [K, N]
    if scale is not None:
        k, n = w.shape
        w = (w.reshape(k // group_size, group_size, n) * scale.astype(jnp.float32)[:, None]
             ).reshape(k, n)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def quant_matmul_multi_ref(
    x: jax.Array,
    weights: Sequence[tuple[jax.Array, jax.Array | None]],
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    norm: jax.Array | None = None,
    eps: float = 1e-6,
) -> tuple[jax.Array, ...]:
    """Pure-jnp float32 reference: tuple of `quant_matmul_ref` over the weights -> [M, N_i] each."""
    del block_sizes, interpret
    weights = _check_weights(x, weights, bits, group_size)
    return tuple(quant_matmul_ref(x, q, s, bits=bits, group_size=group_size, norm=norm, eps=eps)
                 for q, s in weights)
