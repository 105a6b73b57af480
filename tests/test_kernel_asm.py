"""scripts.kernel_asm: our Pallas kernels lowered for CUDA on the CPU, compiled for sm_90 with the
standalone Triton, and the inner loop of the SASS counted."""
import pytest

from scripts import kernel_asm


def test_triton_modules_are_lowered_without_a_gpu():
    kernels = kernel_asm.quant_matmul_kernels(8, 1, 256, [128, 64])  # one multi-weight launch
    assert [k.name for k in kernels] == ["quant_matmul_int8_x2"]
    [k] = kernels
    assert (k.num_warps, k.num_stages) == (4, 3)  # the batch-1 default tiling
    assert "tt.func" in k.ttir and "tt.elementwise_inline_asm" in k.ttir  # the PTX step is in it


def test_block_sizes_option_reaches_the_kernel():
    bs = kernel_asm._block_sizes("block_n=64,num_warps=2,fold=true")
    assert (bs.block_n, bs.num_warps, bs.fold) == (64, 2, True)
    [k] = kernel_asm.quant_matmul_kernels(4, 1, 256, [128], bs)
    assert k.num_warps == 2
    with pytest.raises(SystemExit, match="'block_x' is not a BlockSizes field"):
        kernel_asm._block_sizes("block_x=3")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;            /* 0x00000a0000017a02 */
        /*0010*/                   FFMA R2, R3, R4, R2 ;             /* 0x0000000403027223 */
        /*0020*/              @P0 BRA 0x10 ;                          /* 0xfffffffc00000947 */
        /*0030*/                   LDG.E.128 R4, desc[UR6][R2.64] ;   /* 0x0000000602047981 */
        /*0040*/                   PRMT R5, R4, 0x7610, R5 ;         /* 0x0000761004057816 */
        /*0050*/                   FFMA R6, R5, R5, R6 ;             /* 0x0000000505067223 */
        /*0060*/                   FFMA.FTZ R6, R5, R5, R6 ;         /* 0x0000000505067223 */
        /*0070*/              @!P1 BRA 0x30 ;                         /* 0xfffffffc00000947 */
        /*0080*/                   EXIT ;                             /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                          /* 0xfffffffc00fc7947 */
"""


def test_loop_mix_counts_the_longest_loop():
    mix = kernel_asm.loop_mix(SASS)  # the loop 0x30..0x70, not 0x10..0x20 nor the final self-branch
    assert mix == {"LDG": 1, "PRMT": 1, "FFMA": 2, "BRA": 1}
    assert kernel_asm.loop_mix("no code") == {}


def test_compiled_for_sm90_registers_and_loop():
    """The bf16 batch-1 GEMV reads int32 words and runs one PTX step per column: its loop is FMAs
    fed by the word's halves (IMAD.U32 or SHF for the low half, LOP3 for the high one)."""
    [k] = kernel_asm.quant_matmul_kernels(16, 1, 512, [512])
    info = kernel_asm.compile_sm90(k)
    assert 0 < info["registers"] <= 255 and info["spill_bytes"] == 0
    mix = kernel_asm.loop_mix(info["sass"])
    assert mix["FFMA"] >= 32 and mix["LDG"] >= 1
    assert mix["LOP3"] >= mix["FFMA"] // 2  # the high halves: one AND each
    line = kernel_asm.report(k)
    assert line.startswith("quant_matmul_int16 warps=4 stages=3 registers=") and "FFMA:" in line


@pytest.mark.parametrize("kind,names", [
    ("flash", ["jllm_flash_attention"]), ("decode", ["jllm_decode_attention_append"]),
    ("paged", ["jllm_paged_attention"])])
def test_attention_kernels_are_lowered(kind, names):
    kernels = kernel_asm.attention_kernels(kind, 2, 256, heads=8, kv_heads=2, head_dim=64)
    assert [k.name for k in kernels][:1] == names  # split decode may add its merge kernel after


def test_attention_block_sizes_reach_the_kernel():
    bs = kernel_asm._block_sizes("block_k=32,num_stages=2,num_splits=none", "paged")
    assert (bs.block_k, bs.num_stages, bs.num_splits) == (32, 2, None)
    [k, *_] = kernel_asm.attention_kernels("paged", 2, 256, block_sizes=bs)
    assert k.num_stages == 2
    with pytest.raises(ValueError, match="kind='prefill'"):
        kernel_asm.attention_kernels("prefill", 1, 16)


def test_int8_pages_with_one_head_per_kv_head_compile_to_fmas_without_tensor_cores():
    """The FMA path of int8 paged decode (R = 1): its loop turns bytes into floats with PRMT and
    multiplies with FFMA, with no MMA and no byte-wise shared-memory reads; the dot path (fma=False)
    on the same shape has both (HMMA, LDS)."""
    fma = kernel_asm.compile_sm90(kernel_asm.attention_kernels("paged", 8, 256, heads=4, kv_heads=4, kv="int8")[0])
    mix = kernel_asm.loop_mix(fma["sass"])
    assert fma["spill_bytes"] == 0 and mix["PRMT"] >= 64 and mix["FFMA"] >= 64
    assert not any(op.startswith(("HMMA", "HGMMA")) for op in mix) and mix["LDS"] <= 2  # the block max only
    dot = kernel_asm.attention_kernels("paged", 8, 256, heads=4, kv_heads=4, kv="int8",
                                       block_sizes=kernel_asm._block_sizes("fma=false", "paged"))[0]
    dot_mix = kernel_asm.loop_mix(kernel_asm.compile_sm90(dot)["sass"])
    assert dot_mix["HMMA"] > 0 and dot_mix["LDS"] > mix["LDS"]


def test_int8_fma_path_with_a_max_per_key_slot_has_no_barrier_in_its_loop():
    """row_max: each key slot keeps its own running max, so a step needs no block max across
    warps: no BAR (and no branch for the rescale) in the loop, where the per-program max has both."""
    def mix(row_max):
        bs = kernel_asm._block_sizes(f"row_max={row_max}", "paged")
        [k, *_] = kernel_asm.attention_kernels("paged", 8, 256, heads=4, kv_heads=4, kv="int8", block_sizes=bs)
        return kernel_asm.loop_mix(kernel_asm.compile_sm90(k)["sass"])

    per_slot, per_program = mix("true"), mix("false")
    assert per_program["BAR"] > 0 and "BAR" not in per_slot
    assert per_slot["PRMT"] == per_program["PRMT"] >= 64
