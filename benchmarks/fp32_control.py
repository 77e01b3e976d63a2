"""How far a correct op that accumulates in float32 lands from the float64 reference (CPU).

The reference is run twice on the same inputs: as written (float64 GEMMs and epilogue) and with
every ``.double()`` turned into ``.float()``, which is the op's arithmetic with exact fp32
accumulation and no tensor-core shortcuts. The checker's worst row error between the two is the
floor that rounding-boundary flips alone give; errors far above it on a GPU come from the GPU's
accumulation (results/fp8-accum/NOTES.md).

Usage: python benchmarks/fp32_control.py MODEL TP M DRAWS [QUANT]   (QUANT default fp8_w8a8)
"""

import sys
import time

import torch

from moetune.check import check_close
from moetune.inputs import random_moe_inputs
from moetune.presets import preset_problem
from moetune.reference import fused_experts_reference


def main(model: str, tp: int, M: int, draws: int, quant: str) -> None:
    problem = preset_problem(model, tp, quant=quant)
    double = torch.Tensor.double
    for draw in range(draws):
        t0 = time.time()
        args, kw = random_moe_inputs(problem, M, "cpu", seed=1000 + draw)
        ref = fused_experts_reference(*args, **kw)
        torch.Tensor.double = lambda self: self.float()
        try:
            out32 = fused_experts_reference(*args, **kw)
        finally:
            torch.Tensor.double = double
        c = check_close(out32, ref, dtype=problem.torch_dtype, quant=quant)
        print(f"{model} TP{tp} {quant} M={M} draw {draw}: worst row {c.worst_row_err:.2e}, "
              f"rel {c.rel_err:.2e}, ok={c.ok} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4] if len(a) > 4 else "fp8_w8a8")
