"""The GEMM kernel compiles for Hopper (sm90) on a machine without a GPU.

Triton's interpreter runs the kernel as Python, so it accepts code the compiler rejects (a
value whose type differs between the branches of a run-time ``if``, say). Here a subprocess,
outside the interpreter, has Triton build the op's kernels for sm90 from CPU tensors, as the
sweep's compile processes do (``moetune.precompile.pin_target``), with a stand-in for the CUDA
driver: one token (the direct-slot routing, int32 and int64 router ids) and sixteen, bf16 and
fp8, pointer loads and TMA, which must share their compiled kernels. Skipped where Triton cannot
compile for CUDA here."""

from helpers import compile_for_sm90

SCRIPT = r"""
built = 0
for block_m in (16, 64):  # 64 rows: the weights through TMA
    config = dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1,
                  num_warps=4, num_stages=3)
    for M, ids64 in ((1, False), (1, True), (16, False)):
        for quant in (None, "fp8_w8a8"):
            case = make_case(M, 8, 128, 256, 2, torch.bfloat16, "cpu", quant=quant)
            if ids64:
                case.topk_ids = case.topk_ids.long()
            with compile_only():
                ops.fused_experts(*case.args(), config=config, **case.kwargs)
            built += 1
kernels = len(list(Path(os.environ["TRITON_CACHE_DIR"]).glob("*/fused_moe_kernel.json")))
print("built", built, "kernels", kernels)
"""


def test_the_kernel_compiles_for_hopper(tmp_path):
    stdout = compile_for_sm90(SCRIPT, tmp_path)
    # 12 op calls, 10 kernels: GEMM1 and GEMM2 for each tile and quantization, and GEMM1 of one
    # bf16 token for each tile: no kernel of the op's runs ahead of it there, so it launches
    # without launch_pdl (launch.PDL_GEMM1), part of the compiled kernel. Otherwise one token
    # (the direct routing, int32 or int64 ids) runs the kernels sixteen tokens compiled.
    assert "built 12 kernels 10" in stdout, stdout
