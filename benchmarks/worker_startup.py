"""Where a sweep worker's start-up goes (the fixed seconds before a GPU times its first pair).
Times, in one fresh process on the GPU at hand: importing torch, creating the CUDA context,
importing moetune's evaluation, building the Workload (its input sets, drawn at the largest
batch size), the first evaluation (loads align/activation/GEMM kernels, cuBLAS, the first CUDA
graph) and the next ones. Kernels come from Triton's cache: run a sweep or this script once first.

    python benchmarks/worker_startup.py --model Qwen3-30B-A3B --tp 2
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()
steps: list[tuple[str, float]] = []


def mark(name: str) -> None:
    steps.append((name, time.perf_counter() - T0 - sum(s for _, s in steps)))


import torch  # noqa: E402

mark("import torch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen3-30B-A3B")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--json", help="write the steps here as JSON")
    args = parser.parse_args()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    mark("CUDA context")
    from moetune.evaluate import Workload, evaluate
    from moetune.platform import detect_platform
    from moetune.presets import DEFAULT_BATCH_SIZES, preset_problem

    mark("import moetune.evaluate")
    platform = detect_platform()
    problem = preset_problem(args.model, tp=args.tp)
    mark("detect platform, problem")
    workload = Workload(problem, platform, list(DEFAULT_BATCH_SIZES), "cuda")
    torch.cuda.synchronize()
    mark(f"Workload ({workload.num_sets} input sets)")
    configs = [
        dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4,
             num_stages=3),
        dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4,
             num_stages=3),
    ]  # fmt: skip
    for i, (config, M) in enumerate([(configs[0], 1), (configs[0], 1), (configs[0], 2),
                                     (configs[1], 1), (configs[1], 4096)]):  # fmt: skip
        rec = evaluate(workload, config, M, replays=5)
        mark(f"evaluate #{i + 1} M={M} {rec['status']} (eval_s {rec['eval_s']:.3f})")
    for name, s in steps:
        print(f"{s:7.2f} s  {name}")
    print(f"{sum(s for _, s in steps):7.2f} s  total")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(steps, f, indent=1)


if __name__ == "__main__":
    main()
