"""The sum over top-k kernel's tile on the GPU at hand: each (outputs per program, columns per
program, warps) timed by CUDA-graph replay at the three reference problems' (M, topk, K), bf16,
beside PyTorch's reduce. Input hot in L2, as GEMM2 has just written it in the op.

Usage: python benchmarks/topk_sum_blocks.py OUT.json
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys

import torch

from moetune.topk_sum import topk_sum

SHAPES = [(2, 4096), (8, 2048), (4, 2880)]  # (topk, K): Mixtral TP2, Qwen3 TP2, gpt-oss TP1
MS = [1, 8, 32, 128, 512, 2048, 4096]
ELEMENTS = [256, 512, 1024, 2048, 4096]
BLOCK_K = [256, 512, 1024]
WARPS = [1, 2, 4, 8]
CALLS = 20


def time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / CALLS)
    return best


def measure(topk: int, K: int, M: int) -> dict:
    """Every tile's time at one shape (each output checked first), and PyTorch's reduce's."""
    x = torch.randn(M * topk, K, device="cuda").to(torch.bfloat16)
    ref = x.view(M, topk, K).sum(dim=1).float()
    row = {"M": M, "topk": topk, "K": K}
    row["torch_us"] = time_us(lambda: x.view(M, topk, K).sum(dim=1))
    times = {}
    for e, bk, w in itertools.product(ELEMENTS, BLOCK_K, WARPS):
        if bk > e * 4:
            continue

        def run(e=e, bk=bk, w=w):
            return topk_sum(x, topk, elements=e, max_block_k=bk, num_warps=w)

        err = (run().float() - ref).abs().max()
        assert err <= 0.01 * ref.abs().max(), (e, bk, w, err)
        times[f"{e}/{bk}/{w}"] = time_us(run)
    row["times"] = times
    row["best"] = min(times, key=times.get)
    row["best_us"] = times[row["best"]]
    return row


def main() -> None:
    rows = []
    sys.stdout.reconfigure(line_buffering=True)
    for (topk, K), M in itertools.product(SHAPES, MS):
        row = measure(topk, K, M)
        rows.append(row)
        print(f"topk={topk} K={K} M={M}: torch {row['torch_us']:.2f} µs, best {row['best']} "
              f"{row['best_us']:.2f} µs, now {row['times']['2048/512/4']:.2f}")  # fmt: skip
    with open(sys.argv[1], "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    # One setting for every shape: the geomean over shapes of its time / that shape's best.
    score = {
        k: math.exp(statistics.fmean(math.log(r["times"][k] / r["best_us"]) for r in rows))
        for k in rows[0]["times"]
    }
    for k in sorted(score, key=score.get)[:12]:
        print(f"setting {k}: geomean {score[k]:.3f} of each shape's best")


if __name__ == "__main__":
    main()
