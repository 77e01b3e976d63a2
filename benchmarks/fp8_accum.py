"""fp8 accumulation on Hopper: error and time of fp32 promotion vs the fast wgmma mode.

Mixtral-8x7B TP2 shape (E=8, N=7168, K=4096, top-2), fp8_w8a8 per tensor, bf16 output. For each
batch size and config: the checker's worst-row error against the float64 reference and the
CUDA-graph median time, under each MOETUNE_FP8_ACCUM mode (precise, tile, fast).
Run on a GPU: PYTHONPATH=. python3 benchmarks/fp8_accum.py OUT.json
"""

import json
import os
import sys

import torch

from moetune.check import check_close
from moetune.inputs import random_moe_inputs
from moetune.ops import fused_experts, poisoned_workspace
from moetune.problem import Problem
from moetune.reference import fused_experts_reference
from moetune.timing import time_op

PROBLEM = Problem(8, 7168, 4096, 2, "bfloat16", "fp8_w8a8")
CONFIGS = {
    "M16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 4},
    "M64": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 4},
    "M128": {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 16,
             "num_warps": 8, "num_stages": 3},
}  # fmt: skip


def main(out_path: str) -> None:
    rows = []
    for M in (64, 512, 4096):
        args, kw = random_moe_inputs(PROBLEM, M, "cuda", seed=M)
        ref = fused_experts_reference(*args, **kw)
        for name, cfg in CONFIGS.items():
            for mode in ("precise", "tile", "fast"):
                os.environ["MOETUNE_FP8_ACCUM"] = mode
                with poisoned_workspace():
                    out = fused_experts(*args, config=cfg, **kw)
                chk = check_close(out, ref, dtype=torch.bfloat16, quant="fp8_w8a8")
                t = time_op(
                    lambda i, a=args, c=cfg, k=kw: fused_experts(*a, config=c, **k),
                    1, device="cuda", replays=30,
                )  # fmt: skip
                rows.append(
                    {
                        "M": M,
                        "config": name,
                        "accum": mode,
                        "ok": chk.ok,
                        "worst_row_err": chk.worst_row_err,
                        "rel_err": chk.rel_err,
                        "median_us": t.median_us,
                        "p20_us": t.p20_us,
                        "p80_us": t.p80_us,
                    }
                )
                print(f"M={M:5d} {name:5s} accum={mode:7s} ok={chk.ok!s:5s} "
                      f"worst={chk.worst_row_err:.2e} rel={chk.rel_err:.2e} "
                      f"{t.median_us:9.1f} us", flush=True)  # fmt: skip
    os.environ.pop("MOETUNE_FP8_ACCUM", None)
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "problem": PROBLEM.describe(),
                   "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fp8_accum.json")
