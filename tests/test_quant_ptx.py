"""The inline PTX of the quantized matmul's M == 1 step, executed by a small PTX interpreter.

Interpret mode cannot run PTX, so the kernel's GPU-only inner step is checked here instruction by
instruction (numpy semantics of each opcode) against the plain arithmetic it replaces.
"""
import re

import numpy as np
import pytest

from pallas_kernels.split_k import FOLD_OFFSET, FOLD_SCALE, bias_codes, byte_value, ptx_int8_axpy, ptx_int8_dot4
from pallas_kernels.quant_matmul import (_IDP4A_SCALE, _ptx_bf16_fma, _ptx_dequant_fma, _ptx_int4_bf16,
                                         _ptx_int4_folded, _ptx_int4_idp4a, _ptx_int4_word_fold,
                                         _ptx_int8_word_fma, _ptx_x_limbs, bf16_half, fold_operands,
                                         int4_word_bytes, int4_word_values, int4_words_bf16,
                                         int8_word_values, pack_int4, x_limb_values)


def _run_ptx(code: str, operands: list[np.ndarray], n_out: int = 4) -> list[np.ndarray]:
    """Execute `code` elementwise over uint32 operand arrays; returns outputs $0..$(n_out - 1)."""
    regs = {f"${i}": v.astype(np.uint32) for i, v in enumerate(operands, start=n_out)}
    f32 = lambda a: a.view(np.float32)  # noqa: E731
    u32 = lambda a: np.asarray(a, np.float32).view(np.uint32)  # noqa: E731

    def val(tok):
        if tok.startswith("0f"):
            return np.full_like(operands[0], int(tok[2:], 16), dtype=np.uint32)
        if tok.startswith("0x") or tok.isdigit():
            return np.full_like(operands[0], int(tok, 0), dtype=np.uint32)
        return regs[tok]

    def bf16x2(a):  # the two bf16 halves of each word, as float32
        return [((a >> (16 * h)) << 16).astype(np.uint32).view(np.float32) for h in range(2)]

    def to_bf16(v):  # float64 -> bf16 bits, rounded to nearest even (as the .rn instructions do)
        bits = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)

    def lop3(a, b, c, lut):  # bit i of lut is f at (a, b, c) = (bit 2, bit 1, bit 0 of i)
        out = np.zeros_like(a)
        for i in range(8):
            if lut >> i & 1:
                out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
        return out

    def prmt(a, b, sel):
        src = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
        out = np.zeros_like(a)
        for byte in range(4):
            out |= src[(sel >> (4 * byte)) & 0x7] << (8 * byte)
        return out

    for line in code.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *srcs = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in srcs]
        if op in ("mov.b32", "mov.f32"):
            r = a[0]
        elif op == "dp4a.s32.s32":  # c + the sum of the 4 signed byte products
            sb = lambda v, k: ((v >> (8 * k)) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int64)  # noqa: E731
            r = (a[2].view(np.int32).astype(np.int64)
                 + sum(sb(a[0], k) * sb(a[1], k) for k in range(4))).astype(np.int32).view(np.uint32)
        elif op == "mad.lo.s32":
            r = (a[0].view(np.int32).astype(np.int64) * a[1].view(np.int32) + a[2].view(np.int32)
                 ).astype(np.int64).astype(np.int32).view(np.uint32)
        elif op == "cvt.rn.f32.s32":
            r = u32(a[0].view(np.int32).astype(np.float32))
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "shl.b32":
            r = a[0] << a[1]
        elif op == "prmt.b32":
            r = prmt(a[0], a[1], int(srcs[2], 16))
        elif op == "lop3.b32":
            r = lop3(a[0], a[1], a[2], int(srcs[3], 16))
        elif op == "fma.rn.bf16x2":
            halves = [to_bf16(x.astype(np.float64) * y + z)
                      for x, y, z in zip(bf16x2(a[0]), bf16x2(a[1]), bf16x2(a[2]))]
            r = halves[0] | halves[1] << 16
        elif op == "sub.f32":
            r = u32(f32(a[0]) - f32(a[1]))
        elif op == "add.f32":
            r = u32(f32(a[0]) + f32(a[1]))
        elif op == "mul.f32":
            r = u32(f32(a[0]) * f32(a[1]))
        elif op == "fma.rn.f32":
            r = u32(f32(a[0]).astype(np.float64) * f32(a[1]) + f32(a[2]))  # one rounding
        else:
            raise AssertionError(f"opcode {op} has no interpreter rule")
        assert re.fullmatch(r"\$\d+|[a-z]+\d*", d), d
        regs[d] = np.asarray(r, np.uint32)
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scaled", [False, True])
def test_ptx_step_matches_arithmetic(bits, scaled):
    rng = np.random.default_rng(bits * 2 + scaled)
    n = 256  # asm instances, each over 4 adjacent columns
    code, constraints = _ptx_dequant_fma(bits, scaled)
    halves = 1 if bits == 8 else 2
    assert constraints.count("=r") == 4
    assert constraints.count(",") + 1 == 4 + 1 + 4 * halves + 4 * scaled + 4
    lim = 128 if bits == 8 else 8
    codes = rng.integers(-lim, lim, (halves, n, 4)).astype(np.int8)  # full range, both ends
    codes[:, 0] = [-lim, lim - 1, 0, -1]
    if bits == 8:
        packed = codes[0]
    else:  # the layout pack_int4 makes: low nibble = first half of a group, high = second
        packed = np.asarray(pack_int4(codes.reshape(2, n * 4), 2)).reshape(n, 4)
    words = packed.view(np.uint8).astype(np.uint32)
    word = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    xs = rng.normal(size=(halves, n)).astype(np.float32)  # one x per row, the same for 4 columns
    scale = rng.uniform(0.5, 2, (n, 4)).astype(np.float32)
    acc = rng.normal(size=(n, 4)).astype(np.float32)
    operands = [word]
    for h in range(halves):
        operands += [xs[h].view(np.uint32)] * 4
    if scaled:
        operands += [scale[:, i].view(np.uint32) for i in range(4)]
    operands += [acc[:, i].view(np.uint32) for i in range(4)]

    out = np.stack([o.view(np.float32) for o in _run_ptx(code, operands)], axis=1)  # [n, 4]
    t = sum(xs[h][:, None].astype(np.float64) * codes[h] for h in range(halves))
    want = acc + t * (scale if scaled else 1)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)


def test_folded_int4_ptx_matches_arithmetic():
    """`_ptx_int4_folded` with the operands the kernel builds (`fold_operands`): codes read as
    1 + (c + 8)/128, the offset folded into a per-row term, agree with acc + scale * x . c."""
    rng = np.random.default_rng(7)
    n = 256
    code, constraints = _ptx_int4_folded()
    assert constraints.count("=r") == 4 and constraints.count(",") + 1 == 4 + 1 + 4 * 4 + 4
    codes = rng.integers(-8, 8, (2, n, 4)).astype(np.int8)
    codes[:, 0] = [-8, 7, 0, -1]
    packed = np.asarray(pack_int4(codes.reshape(2, n * 4), 2)).reshape(n, 4)
    words = packed.view(np.uint8).astype(np.uint32)
    word = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    x = rng.normal(size=(2, n)).astype(np.float32) * 3
    scale = rng.uniform(0.5, 2, (n, 4)).astype(np.float32)
    acc = rng.normal(size=(n, 4)).astype(np.float32)
    x_lo, x_hi, r = (np.asarray(v, np.float32) for v in fold_operands(x[0], x[1]))
    operands = [word] + [x_lo.view(np.uint32)] * 4 + [x_hi.view(np.uint32)] * 4 + [r.view(np.uint32)] * 4
    operands += [scale[:, i].view(np.uint32) for i in range(4)] + [acc[:, i].view(np.uint32) for i in range(4)]
    out = np.stack([o.view(np.float32) for o in _run_ptx(code, operands)], axis=1)  # [n, 4]
    t = x[0][:, None].astype(np.float64) * codes[0] + x[1][:, None].astype(np.float64) * codes[1]
    want = acc + t * scale
    # Each FMA rounds a term of size ~136 |x| (not ~8 |x| as the plain step does): a few float32
    # ulps of that, times the scale, plus the final accumulation.
    bound = 4 * 2.0**-24 * (136 * (np.abs(x[0]) + np.abs(x[1]))[:, None] * scale + np.abs(want))
    err = np.abs(out - want)
    assert (err <= bound).all(), (err / bound).max()
    # The old step on the same bytes gives the same result: the two are interchangeable.
    old, _ = _ptx_dequant_fma(4, True)
    ops_old = [word] + [x[0].view(np.uint32)] * 4 + [x[1].view(np.uint32)] * 4
    ops_old += [scale[:, i].view(np.uint32) for i in range(4)] + [acc[:, i].view(np.uint32) for i in range(4)]
    out_old = np.stack([o.view(np.float32) for o in _run_ptx(old, ops_old)], axis=1)
    assert (np.abs(out - out_old) <= 2 * bound).all()


def test_bf16_word_step_matches_arithmetic():
    """`_ptx_bf16_fma` and its interpret-mode twin `bf16_half`: a word holds 2 bf16 weights of
    adjacent columns (column 0 in the low half, as memory orders them); each column's step adds
    x * weight to that column's acc."""
    rng = np.random.default_rng(3)
    n = 256
    w = rng.normal(size=(n, 2)).astype(np.float32)
    bits16 = (w.view(np.uint32) >> 16).astype(np.uint32)  # truncated to bf16
    word = bits16[:, 0] | bits16[:, 1] << 16
    wb = (bits16 << 16).view(np.float32)  # the bf16 values, as float32
    x = rng.normal(size=n).astype(np.float32)
    acc = rng.normal(size=(n, 2)).astype(np.float32)
    for i in range(2):
        code, constraints = _ptx_bf16_fma(i)
        assert constraints == "=r,r,r,r"
        [out] = _run_ptx(code, [word, x.view(np.uint32), acc[:, i].view(np.uint32)], n_out=1)
        np.testing.assert_allclose(out.view(np.float32), acc[:, i] + x * wb[:, i], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(bf16_half(word.view(np.int32), i)), wb[:, i])


@pytest.mark.parametrize("fold", [False, True], ids=["exact", "fold"])
def test_int8_attention_steps_match_arithmetic(fold):
    """The int8 pages' FMA steps (`ptx_int8_dot4`, `ptx_int8_axpy`) and their interpret-mode twin
    `byte_value`, on words of 4 codes over the full range: exact gives the codes themselves,
    fold gives f = 1 + (c + 128) / 2**15, from which FOLD_SCALE * f - FOLD_OFFSET recovers c."""
    rng = np.random.default_rng(5 + fold)
    n = 512
    codes = rng.integers(-128, 128, (n, 4)).astype(np.int8)
    codes[0] = [-128, 127, 0, -1]
    words = bias_codes(codes.view(np.int32)[:, 0])  # little-endian: byte i is element 4w + i
    words = np.asarray(words)
    values = np.stack([np.asarray(byte_value(words, i, fold)) for i in range(4)], axis=1)  # [n, 4]
    c = codes.astype(np.float64)
    if fold:
        np.testing.assert_array_equal(values, 1 + (c + 128) / 2**15)
        np.testing.assert_array_equal(FOLD_SCALE * values.astype(np.float64) - FOLD_OFFSET, c)
    else:
        np.testing.assert_array_equal(values, c)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    code, constraints = ptx_int8_dot4(fold)
    assert constraints == "=r,r,r,r,r,r"
    [dot] = _run_ptx(code, [words.view(np.uint32)] + [x[:, i].view(np.uint32) for i in range(4)], n_out=1)
    terms = x.astype(np.float64) * values
    want = terms.sum(axis=1)
    bound = 4 * 2.0**-24 * np.abs(terms).sum(axis=1)  # a float32 rounding per FMA of the chain
    assert (np.abs(dot.view(np.float32) - want) <= bound).all()
    acc = rng.normal(size=n).astype(np.float32)
    for i in range(4):
        code, constraints = ptx_int8_axpy(fold, i)
        assert constraints == "=r,r,r,r"
        [out] = _run_ptx(code, [words.view(np.uint32), x[:, 0].view(np.uint32), acc.view(np.uint32)], n_out=1)
        want = acc.astype(np.float64) + x[:, 0].astype(np.float64) * values[:, i]
        assert (np.abs(out.view(np.float32) - want) <= 2.0**-24 * np.abs(want)).all()  # one rounding


def test_int4_bf16_ptx_and_jnp_twin_match_codes():
    """`_ptx_int4_bf16` on int32 words of 4 packed bytes (the mma path) and its interpret-mode twin
    `int4_words_bf16` both give the bf16 codes of each half, in column order."""
    rng = np.random.default_rng(11)
    n = 256  # words
    codes = rng.integers(-8, 8, (2, n, 4)).astype(np.int8)  # [half, word, byte]
    codes[:, 0] = [-8, 7, 0, -1]
    packed = ((codes[0] & 0x0F) | (codes[1] << 4)).astype(np.int8)  # low nibble: half 0
    words = packed.view(np.uint8).astype(np.uint32)
    word = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    for half in range(2):
        code, constraints = _ptx_int4_bf16(half)
        assert constraints.count("=r") == 2 and constraints.count(",") + 1 == 2 + 4
        outs = _run_ptx(code, [word] * 4, n_out=2)  # the kernel passes the word once per bf16
        got = np.stack([((o >> (16 * h)) << 16).astype(np.uint32).view(np.float32)
                        for o in outs for h in range(2)], axis=1)  # [word, byte]
        np.testing.assert_array_equal(got, codes[half].astype(np.float32))
        twin = int4_words_bf16(word.view(np.int32)[None, :], half)  # [1, 4 n]
        np.testing.assert_array_equal(np.asarray(twin, np.float32).reshape(n, 4),
                                      codes[half].astype(np.float32))


def _words(rng, n):
    """n random int32 words of 4 bytes (any bytes: int4 codes, int8 codes), as uint32."""
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)


def _nibble(w, byte, high):
    """The signed int4 code in nibble `high` of byte `byte` of each word."""
    v = (w >> (8 * byte + 4 * high)) & 0xF
    return np.where(v >= 8, v.astype(np.int64) - 16, v.astype(np.int64))


def test_x_limbs_ptx_rebuild_x_to_15_bits():
    """`_ptx_x_limbs`: x = peak / 127 * (hi + lo / 254) to half a lo step, and the same limbs as
    the interpret-mode twin `x_limb_values` but for rounding ties."""
    rng = np.random.default_rng(11)
    n = 512
    x = (rng.normal(size=(4, n)) * np.exp(rng.normal(size=(4, n)) * 2)).astype(np.float32)
    x[:, 0] = [300.0, 1.0, -1.0, 0.0]  # an outlier in its set of 8
    x[:, 1] = 0.0  # all zero: peak clamped, no NaN
    peak = np.maximum(np.abs(x).max(axis=0), np.float32(1e-30)).astype(np.float32)
    inv = (np.float32(127.0) / peak).astype(np.float32)
    limbs = []
    for limb in (0, 1):
        code, constraints = _ptx_x_limbs(limb)
        assert constraints == "=r,r,r,r,r,r"
        (w,) = _run_ptx(code, [v.view(np.uint32) for v in x] + [inv.view(np.uint32)], n_out=1)
        limbs.append(np.stack([((w >> (8 * s)) & 0xFF).astype(np.uint8).view(np.int8) for s in range(4)]))
    hi, lo = (v.astype(np.float64) for v in limbs)
    assert np.abs(hi).max() <= 127 and np.abs(lo).max() <= 127
    rebuilt = peak / 127.0 * (hi + lo / 254.0)
    assert (np.abs(rebuilt - x) <= peak / 127.0 / 254.0 * 0.5 * (1 + 1e-3) + 1e-30).all()  # + f32 rounding
    twin = [np.asarray(v) for v in x_limb_values(x, inv[None, :])]
    assert (twin[0] == hi).mean() > 0.99 and (twin[1] == lo).mean() > 0.98


def test_idp4a_ptx_matches_arithmetic():
    """`_ptx_int4_idp4a`: column i of 4 packed words (4 rows), with x's limbs, adds
    float(254 h + l) * scale, which is scale / _IDP4A_SCALE times x . c to the limbs' precision."""
    rng = np.random.default_rng(12)
    n = 256
    ws = [_words(rng, n) for _ in range(4)]
    limbs = [_words(rng, n) for _ in range(4)]  # hi-limb lo, hi-limb hi, lo-limb lo, lo-limb hi
    for v in limbs:  # keep the bytes in [-127, 127], as _ptx_x_limbs makes them
        b = v.view(np.uint8).reshape(n, 4)
        b[b == 0x80] = 0x81
    se = rng.uniform(0.5, 2, n).astype(np.float32)
    acc = rng.normal(size=n).astype(np.float32)
    byte = lambda v, k: ((v >> (8 * k)) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int64)  # noqa: E731
    for i in range(4):
        code, constraints = _ptx_int4_idp4a(i)
        assert constraints.count("=r") == 1 and constraints.count(",") == 10
        (out,) = _run_ptx(code, ws + limbs + [se.view(np.uint32), acc.view(np.uint32)], n_out=1)
        comb = sum(16 * _nibble(ws[s], i, h) * (254 * byte(limbs[h], s) + byte(limbs[2 + h], s))
                   for s in range(4) for h in (0, 1))
        want = acc.astype(np.float64) + comb.astype(np.float32).astype(np.float64) * se
        np.testing.assert_allclose(out.view(np.float32), want, rtol=1e-6, atol=1e-6)
    assert _IDP4A_SCALE == 1.0 / (127 * 16 * 254)


@pytest.mark.parametrize("subs", [1, 4])
def test_int4_word_fold_ptx_matches_arithmetic(subs):
    """`_ptx_int4_word_fold` over `subs` words (the same column of `subs` rows) and its twin
    `int4_word_values`: acc + scale * x . c, the offsets folded into r (`fold_operands`)."""
    rng = np.random.default_rng(13 + subs)
    n = 256
    ws = [_words(rng, n) for _ in range(subs)]
    x = rng.normal(size=(subs, 2, n)).astype(np.float32) * 3
    terms = [[np.asarray(v, np.float32) for v in fold_operands(x[j, 0], x[j, 1])] for j in range(subs)]
    r = sum(t[2] for t in terms).astype(np.float32)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    acc = rng.normal(size=n).astype(np.float32)
    magic = np.full(n, 0x3F000000, np.uint32)
    for i in range(4):
        cs = [c for w in ws for c in (np.asarray(v).view(np.uint32) for v in int4_word_bytes(w.view(np.int32)))]
        xs = [t[h].view(np.uint32) for t in terms for h in (0, 1)]
        code, _ = _ptx_int4_word_fold(i, subs)
        (out,) = _run_ptx(code, cs + xs + [r.view(np.uint32), scale.view(np.uint32), acc.view(np.uint32), magic],
                          n_out=1)
        dot = sum(x[j, h].astype(np.float64) * _nibble(ws[j], i, h) for j in range(subs) for h in (0, 1))
        want = acc + scale * dot
        bound = 8 * subs * 2.0**-24 * (136 * np.abs(x).sum(axis=(0, 1)) * scale + np.abs(want))
        assert (np.abs(out.view(np.float32) - want) <= bound).all()
        # the twin: 1 + u / 128 per code, u = c + 8
        for j, w in enumerate(ws):
            lo, hi = (np.asarray(int4_word_values(np.asarray(c).view(np.int32), i))
                      for c in int4_word_bytes(w.view(np.int32)))
            np.testing.assert_array_equal(lo, 1 + (_nibble(w, i, 0) + 8) / 128)
            np.testing.assert_array_equal(hi, 1 + (_nibble(w, i, 1) + 8) / 128)


@pytest.mark.parametrize("subs", [1, 4])
def test_int8_word_ptx_matches_arithmetic(subs):
    """`_ptx_int8_word_fma` over `subs` words and its twin `int8_word_values`: acc + x . code."""
    rng = np.random.default_rng(17 + subs)
    n = 256
    ws = [_words(rng, n) for _ in range(subs)]
    x = rng.normal(size=(subs, n)).astype(np.float32)
    acc = rng.normal(size=n).astype(np.float32)
    magic = np.full(n, 0x4B000000, np.uint32)
    byte = lambda v, k: ((v >> (8 * k)) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int64)  # noqa: E731
    for i in range(4):
        flipped = [w ^ np.uint32(0x80808080) for w in ws]
        code, _ = _ptx_int8_word_fma(i, subs)
        (out,) = _run_ptx(code, flipped + [v.view(np.uint32) for v in x] + [acc.view(np.uint32), magic], n_out=1)
        want = acc + sum(x[j].astype(np.float64) * byte(ws[j], i) for j in range(subs))
        np.testing.assert_allclose(out.view(np.float32), want, rtol=1e-5, atol=1e-4)
        for w in ws:
            np.testing.assert_array_equal(np.asarray(int8_word_values(w.view(np.int32), i)), byte(w, i))
