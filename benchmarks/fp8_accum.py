"""fp8 accumulation on Hopper: error and time of fp32 promotion vs the fast wgmma mode.

Mixtral-8x7B TP2 shape (E=8, N=7168, K=4096, top-2), fp8_w8a8 per tensor, bf16 output. For each
batch size and config: the checker's worst-row error against the float64 reference and the
CUDA-graph median time, under each MOETUNE_FP8_ACCUM mode named (default: precise, tile, fast;
``auto`` picks tile or fast by the config's BLOCK_SIZE_M). The error is given twice: against
the plain reference (``worst_row_err_plain``) and against the reference that follows the op's
re-quantization where it was a valid rounding (``worst_row_err``, what the checker uses:
``moetune.check.check_op``), with the share of re-quantized elements the op rounded differently
(``flipped``).
Run on a GPU: PYTHONPATH=. python3 benchmarks/fp8_accum.py OUT.json
  [--model Qwen3-30B-A3B --tp 2 --configs M64-N128-K128-G16-w8-s4,...] [--batch-sizes 64,512]
  [--modes precise,tile,fast,auto] [--seeds 5]   (worst row error over that many input draws)
"""

import json
import os
import sys

import torch

from moetune.check import check_close
from moetune.inputs import random_moe_inputs
from moetune.ops import capture_requantized, fused_experts, poisoned_workspace
from moetune.presets import preset_problem
from moetune.problem import Problem
from moetune.reference import Reference
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


def _cfg(name: str) -> dict:
    """``M64-N128-K128-G16-w8-s4`` → a config dict (the sweep's candidate names)."""
    keys = {"M": "BLOCK_SIZE_M", "N": "BLOCK_SIZE_N", "K": "BLOCK_SIZE_K", "G": "GROUP_SIZE_M",
            "w": "num_warps", "s": "num_stages"}  # fmt: skip
    return {keys[part[0]]: int(part[1:]) for part in name.split("-")}


def _arg(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def main(out_path: str) -> None:
    problem, configs = PROBLEM, CONFIGS
    if "--model" in sys.argv:
        if "--configs" not in sys.argv:
            sys.exit("Error: --model needs --configs (candidate names: M64-N128-K128-G16-w8-s4)")
        problem = preset_problem(_arg("--model", ""), int(_arg("--tp", "1")), quant="fp8_w8a8")
        configs = {c: _cfg(c) for c in _arg("--configs", "").split(",")}
    batch_sizes = [int(m) for m in _arg("--batch-sizes", "64,512,4096").split(",")]
    modes = _arg("--modes", "precise,tile,fast").split(",")
    seeds = int(_arg("--seeds", "1"))
    rows = []
    for M in batch_sizes:
        inputs = []
        for s in range(seeds):
            args, kw = random_moe_inputs(problem, M, "cuda", seed=M + 7919 * s)
            inputs.append((args, kw, Reference(*args, **kw)))
        for name, cfg in configs.items():
            for mode in modes:
                os.environ["MOETUNE_FP8_ACCUM"] = mode
                worst, plain, rel, flipped, ok = [], [], [], [], True
                for args, kw, ref in inputs:
                    # check_op's steps, spelled out to keep the re-quantized operand
                    with poisoned_workspace(), capture_requantized() as seen:
                        out = fused_experts(*args, config=cfg, **kw)
                    chk = check_close(out, ref.matching(seen[0]), dtype=problem.torch_dtype,
                                      quant="fp8_w8a8")  # fmt: skip
                    a2 = seen[0][0].float()
                    flipped.append(float((a2 != ref.a2.float()).float().mean()))
                    plain.append(check_close(out, ref.output, dtype=problem.torch_dtype,
                                             quant="fp8_w8a8").worst_row_err)  # fmt: skip
                    worst.append(chk.worst_row_err)
                    rel.append(chk.rel_err)
                    ok = ok and chk.ok
                args, kw, _ = inputs[0]
                t = time_op(
                    lambda i, a=args, c=cfg, k=kw: fused_experts(*a, config=c, **k),
                    1, device="cuda", replays=30,
                )  # fmt: skip
                rows.append({"M": M, "config": name, "accum": mode, "ok": ok,
                             "worst_row_err": max(worst), "worst_row_errs": worst,
                             "worst_row_err_plain": max(plain), "flipped": max(flipped),
                             "rel_err": max(rel), "median_us": t.median_us,
                             "p20_us": t.p20_us, "p80_us": t.p80_us})  # fmt: skip
                print(f"M={M:5d} {name:22s} accum={mode:7s} ok={ok!s:5s} "
                      f"worst={max(worst):.2e} (of {seeds}) plain={max(plain):.2e} "
                      f"flipped={max(flipped):.1e} rel={max(rel):.2e} "
                      f"{t.median_us:9.1f} us", flush=True)  # fmt: skip
    os.environ.pop("MOETUNE_FP8_ACCUM", None)
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "problem": problem.describe(),
                   "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    first = sys.argv[1] if len(sys.argv) > 1 else "--"
    main(first if not first.startswith("--") else "fp8_accum.json")
