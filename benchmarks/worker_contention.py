"""Why a pair costs more host time when 4 GPUs sweep at once than when one does.

On a 4x H200 host a full-space sweep's pairs took 23.3 ms at M=1 on 4 GPUs against 17.0 ms on
one GPU (results/full-space-0.5/), about 5 ms more at small batch sizes and ~1 ms at large
ones, after compiling had ended too. Each pair is CPU work (launches, a CUDA-graph capture in a
fresh private memory pool, instantiation, replays); the guess is that the per-capture
cudaMalloc/cudaFree of a new pool meet in the driver across processes.

This runs the sweep's own `evaluate` on the same few candidates and batch sizes in 1 process,
then in one process per GPU at once, in variants:
  shared - as the sweep runs now: every capture of a process in one graph memory pool
           (``moetune.timing.graph_pool``; first measured as "pool");
  fresh  - a new private pool per capture, as before (first measured as "base").
Prints mean ms per pair per batch size for each (variant, processes).

    python benchmarks/worker_contention.py --procs 1,4 --variants fresh,shared --pairs 240
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

CONFIGS = [
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
     "num_warps": 4, "num_stages": 2},
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
     "num_warps": 4, "num_stages": 5},
    {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 32,
     "num_warps": 8, "num_stages": 3},
]  # fmt: skip
BATCH_SIZES = [1, 64, 512]


def _worker(gpu: int, variant: str, pairs: int, barrier, out) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)

    from moetune import timing
    from moetune.evaluate import Workload, evaluate
    from moetune.platform import detect_platform
    from moetune.presets import preset_problem

    if variant == "fresh":  # a new private pool per capture, as before timing.graph_pool
        timing.graph_pool = lambda device: None
    problem = preset_problem("Qwen3-30B-A3B", 2)
    workload = Workload(problem, detect_platform(), BATCH_SIZES, "cuda")
    work = [(c, M) for c in CONFIGS for M in BATCH_SIZES]
    for c, M in work:  # compile / load everything before the clock starts
        rec = evaluate(workload, c, M, replays=20)
        assert rec["status"] == "ok", rec
    barrier.wait()
    times: dict[int, list[float]] = {M: [] for M in BATCH_SIZES}
    for i in range(pairs):
        c, M = work[i % len(work)]
        rec = evaluate(workload, c, M, replays=20)
        assert rec["status"] == "ok", rec  # a failed capture would look cheap
        times[M].append(rec["eval_s"])
    out.put((gpu, {M: statistics.mean(v) * 1e3 for M, v in times.items()}))


def run(procs: int, variant: str, pairs: int) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(g, variant, pairs, barrier, out)) for g in range(procs)]
    for p in ps:
        p.start()
    got = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    return {M: statistics.mean(r[M] for _, r in got) for M in BATCH_SIZES}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", default="1,4")
    parser.add_argument("--variants", default="fresh,shared")
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        for n in (int(x) for x in args.procs.split(",")):
            t0 = time.time()
            ms = run(n, variant, args.pairs)
            rows.append({"variant": variant, "procs": n, "ms_per_pair": ms,
                         "wall_s": round(time.time() - t0, 1)})  # fmt: skip
            print(f"{variant:5} procs={n}  " + "  ".join(f"M={M}: {v:6.2f} ms" for M, v in
                  ms.items()) + f"  ({rows[-1]['wall_s']} s)", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
