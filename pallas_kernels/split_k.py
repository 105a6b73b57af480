"""The split-K ("flash decoding") skeleton shared by the decode and paged attention kernels.

Backend: Pallas-Triton. A program owns the R = H / G query heads of one KV head (times some query
tokens, for the paged multi-query kernel) and one slice of the visible keys. The rows form the M
side of a small tensor-core dot, padded to >= 16. `online_softmax_step` is one step of the
FlashAttention-2 recurrence in base 2; with one split the kernel normalises and writes the output
itself (`store_result`), with several each split writes its unnormalised output and its running
max m and sum l, and `merge_splits` (a second small kernel) combines them by log-sum-exp.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton

MASK_VALUE = -1e30  # finite: an empty split never computes inf - inf
LOG2_E = math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x * log2(e))
MIN_BLOCKS_PER_SPLIT = 4  # shorter splits spend more on their prologue and the merge than they save


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the decode and paged kernels.

    block_k: keys per inner-loop step. num_splits: programs per (row, KV head) along the length;
    None picks about one program per SM for decode (programs_per_sm of resolve_splits). block_q
    (paged_attention_mq only): query tokens per program, a power of 2; None fills about 64 rows
    (64 / R tokens, at least 1). fma (paged_attention over int8 pages with one query head per KV
    head, R = 1): True or None runs the keys through a register FMA reduction over the codes'
    bytes (`int8_dot4`, `int8_axpy4`) instead of the tensor-core dots, False keeps the dots.
    row_max (FMA path): a running max per key slot instead of one per program (no cross-warp max
    per step; paged_int8_fma).
    """
    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 4
    block_q: int | None = None
    fma: bool | None = None
    row_max: bool = False

    def __post_init__(self):
        if not isinstance(self.block_k, int) or self.block_k < 16 or not is_pow2(self.block_k):
            raise ValueError(f"block_k={self.block_k!r} must be a power of 2 and >= 16")
        if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
            raise ValueError(f"num_splits={self.num_splits!r} must be None or an int >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")
        if self.block_q is not None and (not isinstance(self.block_q, int) or not is_pow2(self.block_q)):
            raise ValueError(f"block_q={self.block_q!r} must be None or a power of 2")
        if self.fma not in (None, True, False):
            raise ValueError(f"fma={self.fma!r} must be None, True or False")
        if self.row_max not in (True, False):
            raise ValueError(f"row_max={self.row_max!r} must be True or False")


def num_sms() -> int:
    """Streaming multiprocessors of the first device (132 where the device does not say)."""
    return getattr(jax.devices()[0], "core_count", 132)


def resolve_splits(
    block_sizes: BlockSizes, programs: int, max_len: int, programs_per_sm: int = 1
) -> int:
    """Static split count: the requested one, or about programs_per_sm programs per SM over the
    `programs` (row, KV head, query block) programs of one split.

    Measured on an H100: contiguous decode streams best with one long program per SM; the paged
    kernel's gathers want more programs in flight (programs_per_sm=2).
    """
    if block_sizes.num_splits is not None:
        return min(block_sizes.num_splits, max(1, pl.cdiv(max_len, block_sizes.block_k)))
    wanted = num_sms() * programs_per_sm // programs
    return max(1, min(wanted, pl.cdiv(max_len, MIN_BLOCKS_PER_SPLIT * block_sizes.block_k)))


def split_range(
    length: jax.Array, block_k: int, num_splits: int, split: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Key blocks [lo, hi) of one split: the blocks of keys [0, length) divided evenly among the splits."""
    num_blocks = pl.cdiv(length, block_k)
    per_split = pl.cdiv(num_blocks, num_splits)
    lo = split * per_split
    return lo, jnp.minimum(lo + per_split, num_blocks)


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The empty (acc [rows, K], m [rows], l [rows]) float32 state of `online_softmax_step`."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_ok: jax.Array | None,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    qk_scale: float,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash step: q [rows, K], k, v [block_k, K] -> updated (acc, m, l). q and k may also be
    tuples of matching column blocks (q1 [rows, K1], ...; k1 [block_k, K1], ...): the scores are
    then the sum of their dots.

    key_ok: None (every key visible to every row), [block_k] (per key) or [rows, block_k] (per row
    and key, e.g. causal). A row whose keys are all masked so far keeps m = MASK_VALUE; its l and
    acc are then wiped (alpha = 0) by its first visible key, or its split gets weight 0 in
    `merge_splits`.

    With k_scale, v_scale [block_k] float32, k and v are int8 and are dequantized in registers:
    the scores get k_scale per key column and the probabilities v_scale per key before the PV dot
    (cast to q's dtype there: for float16 q, p * v_scale under 6e-5 keeps fewer bits as a subnormal).
    """
    acc, m, l = carry  # [rows, K] f32, [rows] f32, [rows] f32 (m in log2 units)
    qs, ks = (q, k) if isinstance(q, tuple) else ((q,), (k,))
    if k_scale is not None:  # |int8| <= 127 converts exactly to bf16 (8-bit significand) and f32
        ks, v = tuple(kc.astype(qs[0].dtype) for kc in ks), v.astype(qs[0].dtype)
    s = plgpu.dot(qs[0], ks[0], trans_b=True, allow_tf32=_triton.tf32_ok(qs[0]))  # [rows, block_k]
    for qc, kc in zip(qs[1:], ks[1:]):
        s = s + plgpu.dot(qc, kc, trans_b=True, allow_tf32=_triton.tf32_ok(qc))
    s = s * qk_scale if k_scale is None else s * (k_scale * qk_scale)[None, :]
    if key_ok is not None:
        s = jnp.where(key_ok if key_ok.ndim == 2 else key_ok[None, :], s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)  # [rows] rescales the old sums
    p = jnp.exp2(s - m_new[:, None])  # [rows, block_k]
    l = l * alpha + jnp.sum(p, axis=1)  # l sums the probabilities themselves, before any v_scale
    pv = p if v_scale is None else p * v_scale[None, :]  # [rows, block_k]
    acc = acc * alpha[:, None] + plgpu.dot(pv.astype(v.dtype), v, allow_tf32=_triton.tf32_ok(v))
    return acc, m_new, l


# int8 codes as float32 without a conversion instruction (the batch-1 GEMV's trick). XOR 0x80 turns
# a code c into the byte u = c + 128, and one PRMT writes u into the mantissa of a float constant:
#   exact: 0x4B0000uu is 2**23 + u, and one subtraction gives c;
#   fold:  0x3F80uu00 is f = 1 + u / 2**15, used as it is: a sum of x * c is recovered once per sum
#          as FOLD_SCALE * sum(x * f) - FOLD_OFFSET * sum(x). That saves the subtraction (2
#          instructions per byte instead of 3) and keeps about 16 bits of each float32 sum: far
#          finer than the int8 rounding itself, but not float32-exact.
FOLD_SCALE, FOLD_OFFSET = 32768.0, 32896.0  # 2**15, 2**15 + 128
_CONSTANT = {True: ("0x3F800000", lambda i: 0x3240 + 16 * i), False: ("0x4B000000", lambda i: 0x3104 + i)}


def _ptx_byte_value(fold: bool, word: str, i: int) -> list[str]:
    """PTX lines leaving byte i of `word` (already XOR 0x80808080: bytes u) as a float in v."""
    const, sel = _CONSTANT[fold]
    lines = [".reg .b32 k;", ".reg .f32 v;", f"mov.b32 k, {const};", f"prmt.b32 v, k, {word}, 0x{sel(i):04X};"]
    return lines if fold else lines + ["sub.f32 v, v, 0f4B000080;"]  # 2**23 + u - (2**23 + 128)


def ptx_int8_dot4(fold: bool) -> tuple[str, str]:
    """Inline PTX for one int32 word of 4 biased int8 codes u (elements 4w..4w+3 of a row): the
    sum over i of x_i times the value of byte i (c, or f when folded). Operands: $0 the result, $1
    the word, $2-$5 x_0..x_3 (float32)."""
    lines = [".reg .f32 t;"]
    for i in range(4):
        body = _ptx_byte_value(fold, "$1", i)
        step = "mul.f32 t, $2, v;" if i == 0 else f"fma.rn.f32 {'$0' if i == 3 else 't'}, ${2 + i}, v, t;"
        lines += ["{", *body, step, "}"]
    return "{\n" + "\n".join(lines) + "\n}", "=r,r,r,r,r,r"


def ptx_int8_axpy(fold: bool, i: int) -> tuple[str, str]:
    """Inline PTX for one int32 word of 4 biased int8 codes: acc + x times the value of byte i.
    Operands: $0 the new acc, $1 the word, $2 x, $3 the old acc (float32). (One result per asm:
    Pallas-Triton lowers a multi-result asm as one value; ptxas shares the constant across the 4.)"""
    lines = _ptx_byte_value(fold, "$1", i) + ["fma.rn.f32 $0, $2, v, $3;"]
    return "{\n" + "\n".join(lines) + "\n}", "=r,r,r,r"


def bias_codes(words: jax.Array) -> jax.Array:
    """int32 words of 4 int8 codes c -> the same words with bytes u = c + 128 (one XOR per word,
    shared by every asm that reads the word)."""
    return words ^ jnp.int32(-0x7F7F7F80)  # 0x80808080 as an int32


def byte_value(words: jax.Array, i: int, fold: bool) -> jax.Array:
    """The jnp form of the PTX above: byte i of each biased word as float32 (c, or f when folded)."""
    u = (words >> (8 * i)) & 0xFF
    if fold:
        return lax.bitcast_convert_type((u << 8) | 0x3F800000, jnp.float32)
    return lax.bitcast_convert_type(u | 0x4B000000, jnp.float32) - float(2**23 + 128)


def int8_dot4(words: jax.Array, xs: list, fold: bool, compiled: bool) -> jax.Array:
    """words [..., W] int32 (4 biased int8 codes each, `bias_codes`), xs 4 float32 arrays
    broadcastable to it (x_i for byte i) -> [..., W] float32: sum over i of x_i * value(byte i).
    compiled=False (interpret mode, which cannot run PTX) computes the same values in jnp."""
    xs = [jnp.broadcast_to(x, words.shape) for x in xs]
    if not compiled:
        return sum(x * byte_value(words, i, fold) for i, x in enumerate(xs))
    code, constraints = ptx_int8_dot4(fold)
    return plgpu.elementwise_inline_asm(code, args=[words, *xs], constraints=constraints, pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float32)])[0]


def int8_axpy4(words: jax.Array, x: jax.Array, accs: tuple, fold: bool, compiled: bool) -> tuple:
    """words [..., W] int32 (biased), x broadcastable to it, accs 4 float32 [..., W] -> (acc_i + x *
    value(byte i) for i < 4)."""
    x = jnp.broadcast_to(x, words.shape)
    if not compiled:
        return tuple(a + x * byte_value(words, i, fold) for i, a in enumerate(accs))
    shape = jax.ShapeDtypeStruct(words.shape, jnp.float32)
    return tuple(plgpu.elementwise_inline_asm(
        ptx_int8_axpy(fold, i)[0], args=[words, x, a], constraints=ptx_int8_axpy(fold, i)[1], pack=1,
        result_shape_dtypes=[shape])[0] for i, a in enumerate(accs))


def store_result(
    o_ref,  # [..., K]: the program's row block is o_ref.at[idx]
    ml_refs: tuple,  # () or (m_ref, l_ref), o_ref's shape without K
    idx: tuple,  # indexers of the row block, e.g. (pl.ds(head, rows),)
    row_ok: jax.Array,  # the row block's shape, e.g. [rows] or [block_q, heads]: rows to write
    acc: jax.Array,  # [n, K] f32, n = row_ok.size, in row_ok's order
    m: jax.Array,  # [n] f32
    l: jax.Array,  # [n] f32
) -> None:
    """Writes the program's real rows: normalised output (one split) or the partial acc, m, l."""
    shape = (*row_ok.shape, acc.shape[-1])
    out_idx = (*idx, slice(None))
    if not ml_refs:
        out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
        plgpu.store(o_ref.at[out_idx], out.reshape(shape).astype(o_ref.dtype), mask=row_ok[..., None])
        return
    m_ref, l_ref = ml_refs
    plgpu.store(o_ref.at[out_idx], acc.reshape(shape), mask=row_ok[..., None])
    plgpu.store(m_ref.at[idx], m.reshape(row_ok.shape), mask=row_ok)
    plgpu.store(l_ref.at[idx], l.reshape(row_ok.shape), mask=row_ok)


def _merge_kernel(
    o_ref,  # [J, N, K] float32 unnormalised partial outputs of row b
    m_ref,  # [J, N] float32 running max per split, log2 units
    l_ref,  # [J, N] float32 running sum per split
    out_ref,  # [N, K] output of row b
    *,
    group: int,
    rows: int,
    num_splits: int,
):
    """Log-sum-exp merge of the J split results of output rows [i * R, (i + 1) * R) of row b."""
    head_dim = o_ref.shape[-1]
    head = pl.program_id(1) * group
    row_ok = jnp.arange(rows) < group  # [rows]
    head_rows = pl.ds(head, rows)

    def body(j, carry):
        acc, m, l = carry  # [rows, K], [rows], [rows]
        m_j = plgpu.load(m_ref.at[j, head_rows], mask=row_ok, other=MASK_VALUE)  # [rows]
        l_j = plgpu.load(l_ref.at[j, head_rows], mask=row_ok, other=0.0)  # [rows]
        o_j = plgpu.load(o_ref.at[j, head_rows, :], mask=row_ok[:, None], other=0.0)  # [rows, K]
        m_new = jnp.maximum(m, m_j)
        a, w = jnp.exp2(m - m_new), jnp.exp2(m_j - m_new)  # empty splits (m = -1e30) get w = 0
        return acc * a[:, None] + o_j * w[:, None], m_new, l * a + l_j * w

    acc, _, l = lax.fori_loop(0, num_splits, body, init_carry(rows, head_dim))
    out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
    plgpu.store(out_ref.at[head_rows, :], out.astype(out_ref.dtype), mask=row_ok[:, None])


def merge_splits(
    o: jax.Array,  # [B, J, *rows, K] float32, rows e.g. (H,) or (T, H)
    m: jax.Array,  # [B, J, *rows] float32
    l: jax.Array,  # [B, J, *rows] float32
    *,
    group: int,
    dtype,
    interpret: bool,
) -> jax.Array:  # [B, *rows, K]
    """Combines the split-K partials into the normalised output, one program per R = group
    adjacent output rows of one batch row (the query heads of one KV head)."""
    batch, num_splits, *rows, head_dim = o.shape
    n = math.prod(rows)  # contiguous, so R adjacent heads stay adjacent
    o, m, l = o.reshape(batch, num_splits, n, head_dim), m.reshape(batch, num_splits, n), l.reshape(batch, num_splits, n)
    kernel = functools.partial(
        _merge_kernel, group=group, rows=max(16, pl.next_power_of_2(group)), num_splits=num_splits
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, n // group),
        in_specs=[
            pl.BlockSpec((None, num_splits, n, head_dim), lambda b, g: (b, 0, 0, 0)),
            pl.BlockSpec((None, num_splits, n), lambda b, g: (b, 0, 0)),
            pl.BlockSpec((None, num_splits, n), lambda b, g: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, n, head_dim), lambda b, g: (b, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, n, head_dim), dtype),
        compiler_params=_triton.compiler_params(4, 1),
        interpret=interpret,
        name="jllm_merge_splits",
    )(o, m, l)
    return out.reshape(batch, *rows, head_dim)


def split_outputs(batch: int, num_splits: int, rows: tuple[int, ...], head_dim: int, dtype):
    """Output specs and shapes of a split kernel whose grid is (b, ..., j): the final output
    [B, *rows, K] in dtype, or per split the partial o [B, J, *rows, K], m, l [B, J, *rows] float32."""
    zeros = (0,) * len(rows)
    if num_splits == 1:
        specs = pl.BlockSpec((None, *rows, head_dim), lambda b, *_: (b, *zeros, 0))
        shapes = jax.ShapeDtypeStruct((batch, *rows, head_dim), dtype)
        return specs, shapes
    specs = [
        pl.BlockSpec((None, None, *rows, head_dim), lambda b, *rest: (b, rest[-1], *zeros, 0)),
        pl.BlockSpec((None, None, *rows), lambda b, *rest: (b, rest[-1], *zeros)),
        pl.BlockSpec((None, None, *rows), lambda b, *rest: (b, rest[-1], *zeros)),
    ]
    shapes = [
        jax.ShapeDtypeStruct((batch, num_splits, *rows, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, num_splits, *rows), jnp.float32),
        jax.ShapeDtypeStruct((batch, num_splits, *rows), jnp.float32),
    ]
    return specs, shapes


def with_aliased_outputs(out_specs, out_shape, num_splits: int, aliased: list[tuple]) -> tuple[list, list, dict]:
    """`split_outputs`' specs and shapes followed by outputs that update inputs in place (a cache
    the kernel writes): aliased = [(input index, spec, array)] -> (out_specs, out_shape,
    input_output_aliases) for pallas_call. `split_aliased_outputs` takes the results apart."""
    specs = list(out_specs) if num_splits > 1 else [out_specs]
    shapes = list(out_shape) if num_splits > 1 else [out_shape]
    aliases = {index: len(shapes) + n for n, (index, _, _) in enumerate(aliased)}
    specs += [spec for _, spec, _ in aliased]
    shapes += [jax.ShapeDtypeStruct(a.shape, a.dtype) for _, _, a in aliased]
    return specs, shapes, aliases


def split_aliased_outputs(outs: list, num_splits: int, n_aliased: int) -> tuple:
    """pallas_call results of `with_aliased_outputs` -> (the split outputs as `split_outputs`
    shapes them: one array, or [o, m, l]; the n_aliased updated inputs)."""
    split, aliased = outs[:len(outs) - n_aliased], outs[len(outs) - n_aliased:]
    return (split if num_splits > 1 else split[0]), tuple(aliased)


def check_shapes(q: jax.Array, num_kv_heads: int, head_dim: int, layout: str = "[B, H, K]") -> None:
    """q in `layout` (ending in H, K): K a power of 2 >= 16 and H a multiple of the KV heads."""
    if q.ndim != layout.count(",") + 1 or q.shape[-1] != head_dim:
        raise ValueError(f"expected q {layout} with K={head_dim}; got {q.shape=}")
    if q.shape[-2] % num_kv_heads:
        raise ValueError(f"num_heads={q.shape[-2]} not divisible by {num_kv_heads=}")
    if not is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"{head_dim=} must be a power of 2 >= 16 (Triton tiles); use the _ref")


def check_kv_dtypes(
    k: jax.Array, v: jax.Array, k_scale: jax.Array | None, v_scale: jax.Array | None,
    names: tuple[str, str, str, str] = ("k", "v", "k_scale", "v_scale"),
    what: str = "an int8 cache", dims: tuple[str, str] = ("B", "S"),
) -> None:
    """A float cache has no scales; an int8 cache has float32 k_scale, v_scale [B, G, S] for
    k, v [B, S, G, K]. Paged attention checks its pages with its own names and dims."""
    kn, vn, ksn, vsn = names
    scale_dims = f"[{dims[0]}, G, {dims[1]}]"
    if k.dtype != v.dtype:
        raise TypeError(f"{kn} and {vn} must have the same dtype; got {kn}.dtype={k.dtype} {vn}.dtype={v.dtype}")
    if (k_scale is None) != (v_scale is None):
        raise TypeError(f"give both {ksn} and {vsn} ({what}) or neither; got "
                        f"{ksn} {'None' if k_scale is None else 'given'}, "
                        f"{vsn} {'None' if v_scale is None else 'given'}")
    if k_scale is None:
        if k.dtype == jnp.int8:
            raise TypeError(f"{ksn} and {vsn} {scale_dims} float32 are needed for {what}; got neither")
        return
    if k.dtype != jnp.int8:
        raise TypeError(f"{ksn}, {vsn} are only for {what}; got {kn}.dtype={k.dtype}")
    want = (k.shape[0], k.shape[2], k.shape[1])
    for name, s in ((ksn, k_scale), (vsn, v_scale)):
        if s.shape != want:
            raise ValueError(f"expected {name} {scale_dims} = {want} for {kn} [{dims[0]}, {dims[1]}, G, K] = "
                             f"{k.shape}; got {name}.shape={s.shape}")
        if s.dtype != jnp.float32:
            raise TypeError(f"expected {name} float32; got {name}.dtype={s.dtype}")
