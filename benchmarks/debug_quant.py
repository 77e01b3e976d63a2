"""Where the Triton fp8 quantization and PyTorch's part ways on a GPU: runs the op on a problem
at the batch sizes whose checks failed (Mixtral TP2 fp8 M=512; Qwen3 TP2 fp8 M=128/1024/1536),
comparing every activation quantization the op makes (kernel vs PyTorch: scale, amax, codes)
and the op's error against the float64 reference with each.

Usage: python benchmarks/debug_quant.py
"""

from __future__ import annotations

import torch

from moetune import ops
from moetune.check import check_close
from moetune.inputs import random_moe_inputs
from moetune.lookup import config_for
from moetune.presets import preset_problem
from moetune.quant import quantize_activation
from moetune.quant_kernel import quantize_activation_fast
from moetune.reference import fused_experts_reference

CASES = [("Mixtral-8x7B", 2, [256, 512, 1024]), ("Qwen3-30B-A3B", 2, [128, 1024, 1536])]


def main() -> None:
    for name, tp, sizes in CASES:
        problem = preset_problem(name, tp, quant="fp8_w8a8")
        args, kw = random_moe_inputs(problem, max(sizes), "cuda", seed=1)
        for M in sizes:
            a = (args[0][:M], args[1], args[2], args[3][:M], args[4][:M])
            cfg = config_for(
                M,
                problem.E,
                problem.N,
                problem.K,
                problem.topk,
                dtype=problem.torch_dtype,
                quant="fp8_w8a8",
                block_shape=None,
            )
            seen: list[str] = []

            def spy(x, qdtype, seen=seen, **qkw):
                q, s = quantize_activation_fast(x, qdtype, **qkw)
                torch.cuda.synchronize()
                q2, s2 = quantize_activation(x, qdtype, **qkw)
                amax = x.float().abs().amax().item()
                diff = (q.float() != q2.float()).sum().item()
                s1, s2 = s.flatten()[0].item(), s2.flatten()[0].item()
                seen.append(f"shape={tuple(x.shape)} amax={amax:.6g} scale kernel={s1:.9g} "
                            f"torch={s2:.9g} codes differ={diff}")  # fmt: skip
                return q, s

            ref = fused_experts_reference(*a, **kw)
            for label, fn in (("kernel", spy), ("torch", quantize_activation)):
                ops.quantize_activation = fn
                with ops.poisoned_workspace():
                    out = ops.fused_experts(*a, config=cfg, **kw)
                chk = check_close(out, ref, dtype=problem.torch_dtype, quant="fp8_w8a8")
                print(f"{name} M={M} {label}: ok={chk.ok} rel_err={chk.rel_err:.4g} "
                      f"{chk.reason}", flush=True)  # fmt: skip
            ops.quantize_activation = quantize_activation_fast
            for line in seen:
                print("   ", line, flush=True)


if __name__ == "__main__":
    main()
