"""The op's two GEMMs beside PyTorch's grouped GEMMs on the same rows: how much of the op's
distance from the floor at the compute-bound points (M >= 2048: 1.09-1.56x the floor,
results/kernels/NOTES.md §21, §29) a library kernel has too.

For each problem, quantization and batch size:
1. the op (the config the runtime looks up) is checked against the float64 reference, then
   profiled eagerly over the rotating input sets with PDL off, so that GEMM2's duration does not
   include a wait for GEMM1. GEMM1 and GEMM2 are ``fused_moe_kernel#1`` and ``#2``;
2. the same routed rows, sorted by expert outside the profiled calls, go through
   ``torch._grouped_mm`` (bf16) or ``torch._scaled_grouped_mm`` (fp8, with the static
   per-tensor scales broadcast to rows and columns): GEMM1 is [slots, K] x [E, K, 2N] and
   GEMM2 [slots, N] x [E, N, K]. On Hopper both are CUTLASS grouped GEMMs. Their outputs are
   checked against a float64 product for a few experts first, then they are profiled the same
   way.
3. each GEMM's floor: max(FLOPs / peak, the routed experts' weight bytes / bandwidth), with the
   ceilings measured in the same run.

The grouped GEMMs leave out what the op does around its GEMMs (routing, gathering rows, the
activation, the sum over top-k), so they bound only the GEMMs. Rows go to OUT.jsonl as they are
measured, then everything to OUT.

Usage: python benchmarks/grouped_ceiling.py OUT.json [--m 512,2048,4096]
       [--problems Mixtral-8x7B,Qwen3-30B-A3B,gpt-oss-120b] [--quants bf16,fp8_w8a8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_breakdown import PROBLEMS, breakdown  # a script beside this one

from moetune import launch, ops
from moetune.check import check_op
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.lookup import config_for
from moetune.platform import detect_platform
from moetune.presets import preset_problem
from moetune.problem import Problem
from moetune.quant import quantize_activation
from moetune.reference import Reference
from moetune.roofline import Ceilings, measure_ceilings

CHECK_EXPERTS = 3  # experts whose grouped GEMM rows are checked against float64
TOL = 2e-2  # relative error a grouped GEMM's checked rows may have (bf16 output)


def sorted_slots(topk_ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots (token * topk + k) in expert order, and each expert's end offset (int32), as
    ``torch._grouped_mm``'s ``offs`` takes them."""
    order = torch.argsort(topk_ids.flatten(), stable=True)
    counts = torch.bincount(topk_ids.flatten(), minlength=E)
    return order, torch.cumsum(counts, 0).to(torch.int32)


def expert_rows(offs: torch.Tensor) -> torch.Tensor:
    """Each expert's row count from the end offsets."""
    return torch.diff(offs, prepend=offs.new_zeros(1))


def grouped_operands(args: tuple, kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """GEMM1's and GEMM2's operands for one input set: the input's rows gathered in expert
    order (quantized with the static scale for fp8), a random GEMM2 input of the same rows, and
    the weights as [E, K_in, N_out] views of the op's [E, N_out, K_in] tensors."""
    x, w1, w2, _, topk_ids = args
    E, topk = w1.shape[0], topk_ids.shape[1]
    order, offs = sorted_slots(topk_ids, E)
    a1 = x[order // topk].contiguous()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    h = torch.randn(a1.shape[0], w2.shape[2], generator=gen, device=x.device, dtype=x.dtype)
    ops_ = {"offs": offs, "b1": w1.transpose(1, 2), "b2": w2.transpose(1, 2), "a1": a1, "a2": h}
    if kwargs.get("quant") == "fp8_w8a8":
        rows = a1.shape[0]
        for i, key in ((1, "a1"), (2, "a2")):
            ops_[key], s = quantize_activation(ops_[key], w1.dtype, scale=kwargs[f"a{i}_scale"])
            ops_[f"sa{i}"] = s.expand(rows).contiguous()
            w, ws = (w1, kwargs["w1_scale"]) if i == 1 else (w2, kwargs["w2_scale"])
            ops_[f"sb{i}"] = ws.float().reshape(E, 1).expand(E, w.shape[1]).contiguous()
    return ops_


def grouped_gemm(o: dict[str, Any], i: int) -> torch.Tensor:
    """GEMM ``i`` (1 or 2) of :func:`grouped_operands` through PyTorch's grouped GEMM."""
    a, b = o[f"a{i}"], o[f"b{i}"]
    if f"sa{i}" in o:
        return torch._scaled_grouped_mm(a, b, o[f"sa{i}"], o[f"sb{i}"], offs=o["offs"],
                                        out_dtype=torch.bfloat16)  # fmt: skip
    return torch._grouped_mm(a, b, offs=o["offs"])


def check_grouped(o: dict[str, Any], i: int, out: torch.Tensor) -> float:
    """Worst relative error (Frobenius, per expert) of GEMM ``i``'s output against a float64
    product of the same operands, over the first CHECK_EXPERTS experts that hold rows; inf if
    any is not finite."""
    a, b, offs = o[f"a{i}"].double(), o[f"b{i}"].double(), o["offs"].tolist()
    worst, start, done = 0.0, 0, 0
    for e, end in enumerate(offs):
        if end > start and done < CHECK_EXPERTS:
            ref = a[start:end] @ b[e]
            if f"sa{i}" in o:
                ref = ref * o[f"sa{i}"][start:end, None].double() * o[f"sb{i}"][e].double()
            got = out[start:end].double()
            if not torch.isfinite(got).all():
                return float("inf")
            worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
            done += 1
        start = end
    return worst


def gemm_floor_us(flops: float, nbytes: float, peak: float, bandwidth: float) -> float:
    return max(flops / peak, nbytes / bandwidth) * 1e6


def point(problem: Problem, M: int, sets: list, ceilings: Ceilings, name: str, tp: int) -> dict:
    """One batch size's row; ``name`` and ``tp`` label it."""
    quant = problem.quant
    ins = [((x[:M], w1, w2, tw[:M], ti[:M]), kw) for (x, w1, w2, tw, ti), kw in sets]
    if quant:
        ins = [(a, {**k, **static_activation_scales(a, k)}) for a, k in ins]
    cfg = config_for(M, problem.E, problem.N, problem.K, problem.topk,
                     dtype=problem.torch_dtype, quant=quant, block_shape=None)  # fmt: skip
    row: dict[str, Any] = {"problem": name, "tp": tp, "quant": quant or "bf16", "M": M,
                           "config": cfg}  # fmt: skip

    def run(i: int) -> torch.Tensor:
        return ops.fused_experts(*ins[i][0], config=cfg, **ins[i][1])

    chk = check_op(lambda: run(0), Reference(*ins[0][0], **ins[0][1]),
                   dtype=problem.torch_dtype, quant=quant)  # fmt: skip
    row["op_ok"], row["op_rel_err"] = chk.ok, chk.worst_row_err
    pdl = launch.PDL, launch.PDL_GEMM1
    launch.PDL, launch.PDL_GEMM1 = False, False
    try:
        row["op_kernels"] = breakdown(run, len(ins))[0]
    finally:
        launch.PDL, launch.PDL_GEMM1 = pdl
    grouped = [grouped_operands(a, k, seed=100 + n) for n, (a, k) in enumerate(ins)]
    slots = M * problem.topk
    experts = sum(int((expert_rows(o["offs"]) > 0).sum()) for o in grouped) / len(grouped)
    fp8 = quant == "fp8_w8a8"
    peak = ceilings.fp8_flops if fp8 else ceilings.bf16_flops
    wbytes = 1 if fp8 else problem.torch_dtype.itemsize
    shapes = {1: (problem.K, 2 * problem.N), 2: (problem.N, problem.K)}
    for i, (k_in, n_out) in shapes.items():
        op_us = row["op_kernels"].get(f"fused_moe_kernel#{i}")
        row[f"op_gemm{i}_us"] = op_us
        flops, nbytes = 2.0 * slots * k_in * n_out, experts * k_in * n_out * wbytes
        row[f"floor_gemm{i}_us"] = gemm_floor_us(flops, nbytes, peak, ceilings.bandwidth_Bps)
        row.update({f"grouped_gemm{i}_{k}": v for k, v in profile_grouped(grouped, i).items()})
    return row


def profile_grouped(grouped: list[dict[str, Any]], i: int) -> dict[str, Any]:
    """GEMM ``i`` through the grouped GEMM: checked on the first set, then profiled over all."""
    try:
        err = check_grouped(grouped[0], i, grouped_gemm(grouped[0], i))
        kernels = breakdown(lambda n: grouped_gemm(grouped[n], i), len(grouped))[0]
    except Exception as e:  # a library that lacks this case: the op's side still counts
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return {"ok": err <= TOL, "rel_err": err, "kernels": kernels, "us": sum(kernels.values())}


def line(r: dict) -> str:
    parts = [f"{r['problem'][:12]:<12} {r['quant']:<8} M={r['M']:<5}"]
    for i in (1, 2):
        op, fl = r.get(f"op_gemm{i}_us") or 0.0, r[f"floor_gemm{i}_us"]
        lib = r.get(f"grouped_gemm{i}_us") if r.get(f"grouped_gemm{i}_ok") else None
        lib_s, ratio = ("       -", "    -") if not lib else (f"{lib:8.1f}", f"{op / lib:5.2f}x")
        parts.append(f"GEMM{i} op {op:8.1f} grouped {lib_s} floor {fl:8.1f} op/grouped {ratio}")
    return "  ".join(parts)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--m", default="512,2048,4096")
    ap.add_argument("--problems", default=",".join(n for n, _ in PROBLEMS))
    ap.add_argument("--quants", default="bf16,fp8_w8a8")
    a = ap.parse_args(argv)
    ms = [int(m) for m in a.m.split(",")]
    names = a.problems.split(",")
    quants = [None if q == "bf16" else q for q in a.quants.split(",")]
    ceilings = measure_ceilings("cuda")
    print(f"{torch.cuda.get_device_name()}; ceilings: {ceilings}", flush=True)
    fp8 = detect_platform().fp8_torch_dtype
    with open(a.out + "l", "w") as sink:
        for name, tp in PROBLEMS:
            if name not in names:
                continue
            for quant in quants:
                try:
                    problem = preset_problem(name, tp, quant=quant)
                    sets = timing_input_sets(problem, max(ms), "cuda", fp8_dtype=fp8)
                    for M in ms:
                        r = point(problem, M, sets, ceilings, name, tp)
                        sink.write(json.dumps(r, default=str) + "\n")
                        sink.flush()
                        print(line(r), flush=True)
                except Exception as e:  # report and go on with the next problem
                    print(f"{name} TP{tp} {quant}: {type(e).__name__}: {e}", flush=True)
                sets = None
                torch.cuda.empty_cache()
    rows = [json.loads(x) for x in Path(a.out + "l").read_text().splitlines()]
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "ceilings": str(ceilings)}  # fmt: skip
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
