"""Compile our Pallas-Triton kernels for the H200 (sm_90) on a machine without a GPU, and print
what each kernel costs per thread: registers, shared memory, and the instruction mix of its inner
loop (the longest backward branch of its SASS).

    pip install triton==3.9.0      # the Triton compiler with ptxas and cuobjdump (in jllm[test])
    python -m scripts.kernel_asm quant-matmul --bits 4 --m 1 --k 4096 --n 22016 \\
        [--n ...] [--block-sizes block_n=512,block_k=32,prefetch=2] [--norm] [--out DIR]
    python -m scripts.kernel_asm attention --kind flash|decode|paged --batch 1 --seq 2048 \\
        [--heads 32 --kv-heads 32 --head-dim 128] [--block-sizes block_k=64,num_stages=2] [--out DIR]

jax lowers the kernel for CUDA on the CPU (`lowering_platforms=("cuda",)`), which builds the
Triton module each pallas_call carries; this script keeps that module's text and compiles it with
the standalone Triton build. The compiler differs a little from the one inside jaxlib, so treat
the counts as a guide (they matched what the GPU runs well enough to find the byte unpacking in
the batch-1 GEMV; docs/PERFORMANCE.md, 2026-12-04 third round), and time on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size


@dataclasses.dataclass
class Kernel:
    """One pallas_call: its name, Triton module (generic MLIR text) and launch parameters."""
    name: str
    ttir: str
    num_warps: int
    num_stages: int


def triton_modules(fn, *args) -> list[Kernel]:
    """The Triton modules of every pallas_call in jax.jit(fn)(*args), lowered for CUDA (no GPU
    needed), in lowering order."""
    # jax internals: the hook that sees each module before it is serialized (jax 0.10.2, 0.11.2)
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def keep(*a, **k):
        result = lower(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False,
                                                       print_generic_op_form=True))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    calls = re.findall(r'name = "([^"]+)".*?num_stages = (\d+).*?num_warps = (\d+)', hlo)
    if len(calls) != len(modules):
        raise RuntimeError(f"{len(modules)} Triton modules but {len(calls)} Triton custom calls")
    return [Kernel(name, ttir, int(warps), int(stages))
            for ttir, (name, stages, warps) in zip(modules, calls)]


def compile_sm90(kernel: Kernel, out_dir: str | None = None) -> dict:
    """Compile with the standalone Triton for sm_90 -> {registers, spill_bytes, shared_bytes, sass}.
    With out_dir, also writes NAME.ttir, .ttgir, .ptx and .sass there."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise SystemExit("kernel_asm needs the Triton compiler: pip install triton==3.9.0") from None
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as jaxlib compiles (FMA contraction)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(path, "w") as f:
            f.write(kernel.ttir)
        compiled = triton.compile(path, target=GPUTarget(*SM90), options=dict(
            num_warps=kernel.num_warps, num_stages=kernel.num_stages))
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for ext, text in (("ttir", kernel.ttir), ("ttgir", compiled.asm["ttgir"]),
                          ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(out_dir, f"{kernel.name}.{ext}"), "w") as f:
                f.write(text)
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return dict(registers=field("REG"), spill_bytes=field("LOCAL"), shared_bytes=compiled.metadata.shared,
                sass=sass)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.\S*)?\s*([^\s;]*)")


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts (modifiers dropped) of the longest loop in a SASS listing: the instructions
    from the target of the backward branch that spans the most code up to that branch."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSTRUCTION.finditer(sass)]
    loops = [(int(target, 16), address) for address, op, target in code
             if op == "BRA" and target.startswith("0x") and int(target, 16) < address]
    if not loops:
        return collections.Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(op for address, op, _ in code if start <= address <= end)


def report(kernel: Kernel, out_dir: str | None = None) -> str:
    """One line: name, launch, registers, spills, shared memory, loop instructions by opcode."""
    info = compile_sm90(kernel, out_dir)
    mix = loop_mix(info["sass"])
    ops = " ".join(f"{op}:{n}" for op, n in mix.most_common())
    return (f"{kernel.name} warps={kernel.num_warps} stages={kernel.num_stages} "
            f"registers={info['registers']} spill_bytes={info['spill_bytes']} "
            f"shared={info['shared_bytes']} | loop {sum(mix.values())} instructions: {ops}")


def _block_sizes(text: str | None, kind: str = "quant-matmul"):
    """'field=value,...' -> the BlockSizes of that kernel family (None for no text)."""
    if kind == "flash":
        from pallas_kernels.flash_attention import BlockSizes
    elif kind in ("decode", "paged"):
        from pallas_kernels.split_k import BlockSizes
    else:
        from pallas_kernels.quant_matmul import BlockSizes

    if not text:
        return None
    fields = {f.name: f.type for f in dataclasses.fields(BlockSizes)}
    kw = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--block-sizes: {key!r} is not a BlockSizes field ({', '.join(fields)})")
        low = value.lower()
        kw[key] = low == "true" if low in ("true", "false") else None if low == "none" else int(value)
    return BlockSizes(**kw)


def quant_matmul_kernels(bits: int, m: int, k: int, ns: list[int], block_sizes=None,
                         norm: bool = False) -> list[Kernel]:
    """The Triton modules of quant_matmul_multi over bf16 x [m, k] and one weight per N of ns
    (int8 per output channel, int4 in groups of 128, bf16 unscaled: the 7B layouts)."""
    from pallas_kernels.quant_matmul import quant_matmul_multi

    group = {4: 128, 8: k, 16: 0}[bits]
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    if bits == 16:
        weights = [(jax.ShapeDtypeStruct((k, n), jnp.bfloat16), None) for n in ns]
    else:
        weights = [(jax.ShapeDtypeStruct((k // 2 if bits == 4 else k, n), jnp.int8),
                    jax.ShapeDtypeStruct((k // group, n), jnp.bfloat16)) for n in ns]
    w = jax.ShapeDtypeStruct((k,), jnp.bfloat16) if norm else None
    return triton_modules(lambda x, ws, w: quant_matmul_multi(
        x, ws, bits=bits, group_size=group, block_sizes=block_sizes, norm=w), x, weights, w)


def attention_kernels(kind: str, batch: int, seq: int, heads: int = 32, kv_heads: int = 32,
                      head_dim: int = 128, block_sizes=None, page_size: int = 16,
                      kv: str = "bf16") -> list[Kernel]:
    """The Triton modules of one bf16 attention call: causal flash prefill of `seq` tokens, decode
    (with the cache append and RoPE, as the model runs it) over a `seq`-slot cache, or paged
    decode over `seq` keys per row in pages of `page_size` (kv="int8": int8 pages with float32
    scales)."""
    from pallas_kernels.decode_attention import decode_attention_append
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels.paged_attention import paged_attention

    bf16, i32 = jnp.bfloat16, jnp.int32
    spec = jax.ShapeDtypeStruct
    rows = spec((batch,), i32)
    if kind == "flash":
        q, kv = spec((batch, seq, heads, head_dim), bf16), spec((batch, seq, kv_heads, head_dim), bf16)
        return triton_modules(lambda q, k, v, o, n: flash_attention(q, k, v, o, n, block_sizes=block_sizes),
                              q, kv, kv, rows, rows)
    q = spec((batch, heads, head_dim), bf16)
    if kind == "decode":
        kv, new = spec((batch, seq, kv_heads, head_dim), bf16), spec((batch, kv_heads, head_dim), bf16)
        freq = spec((head_dim // 2,), jnp.float32)
        return triton_modules(lambda q, k, v, n, m, kn, vn, f: decode_attention_append(
            q, k, v, n, m, kn, vn, inv_freq=f, block_sizes=block_sizes), q, kv, kv, rows, rows, new, new, freq)
    if kind == "paged":
        pages = -(-seq // page_size)
        tables = spec((batch, pages), i32)
        if kv == "int8":
            pool = spec((batch * pages, page_size, kv_heads, head_dim), jnp.int8)
            scales = spec((batch * pages, kv_heads, page_size), jnp.float32)
            return triton_modules(lambda q, kp, vp, t, n, ks, vs: paged_attention(
                q, kp, vp, t, n, k_scale_pages=ks, v_scale_pages=vs, block_sizes=block_sizes),
                q, pool, pool, tables, rows, scales, scales)
        pool = spec((batch * pages, page_size, kv_heads, head_dim), bf16)
        return triton_modules(lambda q, kp, vp, t, n: paged_attention(q, kp, vp, t, n, block_sizes=block_sizes),
                              q, pool, pool, tables, rows)
    raise ValueError(f"kind={kind!r}: expected flash, decode or paged")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.kernel_asm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("quant-matmul", help="quant_matmul_multi at one shape")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=8)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, nargs="+", default=[22016])
    p.add_argument("--block-sizes", help="BlockSizes fields, e.g. block_n=512,block_k=16,prefetch=2")
    p.add_argument("--norm", action="store_true", help="with the RMSNorm prologue")
    p.add_argument("--out", help="also write each kernel's .ttir, .ttgir, .ptx and .sass here")
    a = sub.add_parser("attention", help="one bf16 attention call: flash prefill, decode or paged decode")
    a.add_argument("--kind", choices=("flash", "decode", "paged"), required=True)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--seq", type=int, default=2048, help="prompt tokens (flash), cache slots or keys")
    a.add_argument("--heads", type=int, default=32)
    a.add_argument("--kv-heads", type=int, default=32)
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--block-sizes", help="BlockSizes fields of that kernel, e.g. block_k=64,num_stages=2")
    a.add_argument("--kv", choices=("bf16", "int8"), default="bf16", help="page type (paged)")
    a.add_argument("--out", help="also write each kernel's .ttir, .ttgir, .ptx and .sass here")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.part == "attention":
        kernels = attention_kernels(args.kind, args.batch, args.seq, args.heads, args.kv_heads,
                                    args.head_dim, _block_sizes(args.block_sizes, args.kind), kv=args.kv)
    else:
        kernels = quant_matmul_kernels(args.bits, args.m, args.k, args.n, _block_sizes(args.block_sizes),
                                       args.norm)
    for kernel in kernels:
        print(report(kernel, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
