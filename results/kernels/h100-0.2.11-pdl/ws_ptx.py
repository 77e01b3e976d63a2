"""Does Triton warp-specialize the GEMM's K loop on this GPU? Compiles the op's kernels for a
prefill tile (Mixtral-8x7B TP2 shapes, M=4096: 128x128 or 128x256 tiles, weights through TMA)
with launch.WARP_SPECIALIZE off and on, and compares the PTX. Usage: python ws_ptx.py"""

import hashlib

import torch
from triton.runtime.jit import JITFunction

from moetune import launch, ops
from moetune.inputs import timing_input_sets
from moetune.presets import preset_problem

kernel = launch.fused_moe_kernel
fn = kernel.fn if not isinstance(kernel, JITFunction) else kernel
print(torch.cuda.get_device_name())
for quant, cfg in ((None, dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64,
                               GROUP_SIZE_M=1, num_warps=8, num_stages=3)),
                   ("fp8_w8a8", dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128,
                                     GROUP_SIZE_M=1, num_warps=8, num_stages=4))):
    problem = preset_problem("Mixtral-8x7B", 2, quant=quant)
    args, kw = timing_input_sets(problem, 4096, "cuda")[0]
    hashes = {}
    for ws in (False, True):
        launch.WARP_SPECIALIZE = ws
        before = {id(k) for dev in fn.device_caches.values() for k in dev[0].values()}
        ops.fused_experts(*args, config=cfg, **kw)
        torch.cuda.synchronize()
        new = [k for dev in fn.device_caches.values() for k in dev[0].values()
               if id(k) not in before]  # fmt: skip
        ptx = [k.asm["ptx"] for k in new]
        hashes[ws] = sorted(hashlib.md5(p.encode()).hexdigest()[:10] for p in ptx)
        ttgir = [k.asm["ttgir"] for k in new]
        print(f"{quant or 'bf16'} ws={ws}: kernels {len(ptx)}, ptx {hashes[ws]}, "
              f"ttg.warp_specialize ops {sum(t.count('ttg.warp_specialize') for t in ttgir)}")
    print(f"{quant or 'bf16'}: PTX {'identical' if hashes[False] == hashes[True] else 'DIFFERS'}")
