"""The decode GEMMs' tiles beyond vLLM's space: does a shorter K loop bring a launch closer to a
plain read of its bytes?

At M=1 each GEMM launch takes 2.7-6.5 µs beyond its weight bytes (results/kernels/NOTES.md §20),
and a plain one-launch read of the same bytes (``decode_stream.py``) shows the time grows with
the number of dependent loads each program makes. The GEMM's programs walk K in
``K / BLOCK_SIZE_K`` steps, ``num_stages - 1`` of them in flight. vLLM's space (and moetune's)
stops at ``BLOCK_SIZE_K = 256`` and 5 stages. This runs the op at one batch size with each
config of a grid that goes past both, checks it against the float64 reference, and reports the
profiler's time of each GEMM launch (``fused_moe_kernel#1`` = GEMM1) and the op's CUDA-graph
time, beside the config the runtime looks up (the main table's entry, run on both GEMMs as
vLLM runs it; a ``_down`` table is not consulted).

Usage: python benchmarks/decode_gemm.py OUT.json [--model Qwen3-30B-A3B --tp 2
       --quant fp8_w8a8 --m 1] [--n 32,64] [--k 128,256,512] [--stages 3,4,5,6] [--warps 4]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from kernel_breakdown import breakdown  # beside this script

from moetune import ops
from moetune.check import check_op
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.lookup import config_for
from moetune.presets import preset_problem
from moetune.reference import Reference
from moetune.timing import time_op


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--quant", default="fp8_w8a8")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--n", default="32,64")
    ap.add_argument("--k", default="128,256,512")
    ap.add_argument("--stages", default="3,4,5,6")
    ap.add_argument("--warps", default="4")
    a = ap.parse_args()
    problem = preset_problem(a.model, a.tp, quant=a.quant or None)
    sets = timing_input_sets(problem, a.m, "cuda")
    if problem.quant and problem.block_shape is None:  # static scales, as kernel_breakdown
        sets = [(args, {**kw, **static_activation_scales(args, kw)}) for args, kw in sets]
    ref = Reference(*sets[0][0], **sets[0][1])
    shipped = config_for(a.m, problem.E, problem.N, problem.K, problem.topk,
                         dtype=problem.torch_dtype, quant=problem.quant,
                         block_shape=problem.block_shape)  # fmt: skip
    grid = [dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, GROUP_SIZE_M=1, num_warps=w,
                 num_stages=s)
            for n, k, s, w in itertools.product(_ints(a.n), _ints(a.k), _ints(a.stages),
                                                _ints(a.warps))]  # fmt: skip
    rows = []
    print(f"{torch.cuda.get_device_name()}: {problem.describe()} M={a.m}", flush=True)
    for cfg in [shipped, *grid]:

        def run(i: int, cfg=cfg) -> torch.Tensor:
            return ops.fused_experts(*sets[i][0], config=cfg, **sets[i][1])

        name = "M{BLOCK_SIZE_M}-N{BLOCK_SIZE_N}-K{BLOCK_SIZE_K}-w{num_warps}-s{num_stages}"
        row = {"config": cfg, "name": name.format(**cfg), "shipped": cfg is shipped}
        try:
            chk = check_op(lambda run=run: run(0), ref, dtype=problem.torch_dtype,
                           quant=problem.quant)  # fmt: skip
        except Exception as e:  # out of shared memory, say: the grid goes on
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            print(f"{row['name']:<24} error {row['error'][:80]}", flush=True)
            continue
        row.update(ok=chk.ok, rel_err=chk.worst_row_err)
        if chk.ok:
            row["graph_us"] = time_op(run, len(sets), device="cuda", replays=20).median_us
            kernels, _ = breakdown(run, len(sets))
            row["gemm1_us"] = kernels.get("fused_moe_kernel#1")
            row["gemm2_us"] = kernels.get("fused_moe_kernel#2")
            if row["gemm1_us"] is None or row["gemm2_us"] is None:  # profiler lost a launch
                row.update(ok=False, error=f"no per-launch GEMM times: {sorted(kernels)}")
        rows.append(row)
        if row["ok"]:
            print(f"{row['name']:<24}{' (shipped)' if row['shipped'] else '':>11} op "
                  f"{row['graph_us']:6.2f} µs  GEMM1 {row['gemm1_us']:5.2f}  GEMM2 "
                  f"{row['gemm2_us']:5.2f}", flush=True)  # fmt: skip
        else:
            print(f"{row['name']:<24} FAILED {row.get('error') or chk.reason}", flush=True)
    timed = [r for r in rows if r.get("ok")]
    shipped_row = next((r for r in timed if r["shipped"]), None)
    for key in ("graph_us", "gemm1_us", "gemm2_us") if timed else ():
        best = min(timed, key=lambda r: r[key])
        base = f"{shipped_row[key]:.2f}" if shipped_row else "failed"
        print(f"best {key}: {best['name']} {best[key]:.2f} µs (shipped {base})")
    with open(a.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "problem": problem.describe(),
                   "M": a.m, "rows": rows}, f, indent=1, default=str)  # fmt: skip


if __name__ == "__main__":
    main()
