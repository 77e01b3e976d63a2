"""Before/after for the routing-metadata and activation kernels, on the GPU at hand.

The same op, config (the shipped table's, else the heuristic default) and inputs, run two ways:
``torch`` with the PyTorch ``moe_align_block_size_torch`` (~30 launches), PyTorch activation
(4-8 launches) and PyTorch fp8 activation quantization (~9 launches each), as moetune 0.1 did,
and ``kernels`` with the Triton versions; ``--quant-step`` adds ``no-quant-kernel`` (Triton
routing and activation, PyTorch quantization) to separate the quantization kernels' share.
Both are checked against the float64 reference before they are timed (CUDA-graph replay, weights
cold in L2), and the floor max(bytes / bandwidth, flops / peak) from ceilings measured on the same
GPU is printed beside them.

``--static`` adds ``static`` for the fp8 problems: the Triton kernels with calibrated static
per-tensor activation scales (one quantization launch per GEMM instead of three), as the
reference figures in issue 5 were measured (vLLM with static fp8 activation scales); the
activation and its re-quantization run as two launches there.

``--align-step`` adds the routing metadata the other way than the op's default
(``align_kernel.ONE_PROGRAM_DEFAULT``): ``align-3-launches`` while the default is one program of
one launch up to ONE_PROGRAM_SLOTS slots, ``align-1-program`` otherwise.

``--fuse-step`` adds ``static-fused`` (implies ``--static``): static scales with the activation
and its re-quantization in one launch (``ops.FUSE_ACTIVATION_QUANT``, the op's default).

Usage: python benchmarks/launch_overhead.py OUT.json [--quick] [--quant-step] [--static]
       [--align-step] [--fuse-step]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from moetune import ops
from moetune.activation import apply_activation, apply_activation_torch
from moetune.align import moe_align_block_size_torch
from moetune.align_kernel import ONE_PROGRAM_DEFAULT, moe_align_block_size
from moetune.check import check_close
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.lookup import config_for
from moetune.platform import detect_platform
from moetune.presets import preset_problem
from moetune.quant import quantize_activation
from moetune.quant_kernel import quantize_activation_fast
from moetune.reference import fused_experts_reference
from moetune.roofline import measure_ceilings, roofline
from moetune.timing import time_op

FUSE_DEFAULT = ops.FUSE_ACTIVATION_QUANT
ALIGN_OTHER = "align-3-launches" if ONE_PROGRAM_DEFAULT else "align-1-program"  # --align-step

PROBLEMS = [("Mixtral-8x7B", 2), ("Qwen3-30B-A3B", 2), ("gpt-oss-120b", 1)]
QUANTS = [None, "fp8_w8a8"]
BATCH_SIZES = [1, 8, 32, 128, 512, 2048, 4096]
VARIANTS = {
    "torch": (moe_align_block_size_torch, apply_activation_torch, quantize_activation),
    "kernels": (moe_align_block_size, apply_activation, quantize_activation_fast),
}
if "--quant-step" in sys.argv:  # also time align + activation kernels with PyTorch quantization
    VARIANTS["no-quant-kernel"] = (moe_align_block_size, apply_activation, quantize_activation)
if "--align-step" in sys.argv:  # the routing metadata the other way than the op's default

    def _align_other_way(*args, **kwargs):
        return moe_align_block_size(*args, one_program=not ONE_PROGRAM_DEFAULT, **kwargs)

    VARIANTS[ALIGN_OTHER] = (
        _align_other_way, apply_activation, quantize_activation_fast)  # fmt: skip


def _static_variants(argv: list[str]) -> list[str]:
    """fp8 rows only: ``static`` (--static), ``static-fused`` (--fuse-step: the activation and
    its static-scale quantization in one launch, ops.FUSE_ACTIVATION_QUANT)."""
    out = ["static"] if "--static" in argv or "--fuse-step" in argv else []
    return out + (["static-fused"] if "--fuse-step" in argv else [])


def _use(variant: str) -> None:
    ops.moe_align_block_size, ops.apply_activation, ops.quantize_activation = VARIANTS[variant]


def bench_problem(name: str, tp: int, quant: str | None, ceilings, batch_sizes) -> list[dict]:
    problem = preset_problem(name, tp, quant=quant)
    fp8 = detect_platform().fp8_torch_dtype
    sets = timing_input_sets(problem, max(batch_sizes), "cuda", fp8_dtype=fp8)
    n = len(sets)
    rows = []
    for M in batch_sizes:
        ins = [((x[:M], w1, w2, tw[:M], ti[:M]), kw) for (x, w1, w2, tw, ti), kw in sets]
        cfg = config_for(M, problem.E, problem.N, problem.K, problem.topk,
                         dtype=problem.torch_dtype, quant=quant, block_shape=None)  # fmt: skip
        ref = fused_experts_reference(*ins[0][0], **ins[0][1])
        row = {"problem": name, "tp": tp, "quant": quant or "bf16", "M": M, "config": cfg,
               "sets": n}  # fmt: skip
        variants = list(VARIANTS) + (_static_variants(sys.argv) if quant else [])
        for variant in variants:
            _use("kernels" if variant.startswith("static") else variant)
            ops.FUSE_ACTIVATION_QUANT = variant == "static-fused"
            vins, vref = ins, ref
            if variant.startswith("static"):  # the same inputs with calibrated static scales
                vins = [(a, {**k, **static_activation_scales(a, k)}) for a, k in ins]
                vref = fused_experts_reference(*vins[0][0], **vins[0][1])

            def run(i: int, ins=vins, cfg=cfg) -> torch.Tensor:
                return ops.fused_experts(*ins[i][0], config=cfg, **ins[i][1])

            with ops.poisoned_workspace():
                chk = check_close(run(0), vref, dtype=problem.torch_dtype, quant=quant)
            row[f"{variant}_ok"] = chk.ok
            row[f"{variant}_rel_err"] = chk.rel_err
            row[f"{variant}_us"] = (
                time_op(run, len(ins), device="cuda", replays=20).median_us if chk.ok else None
            )
        ops.FUSE_ACTIVATION_QUANT = FUSE_DEFAULT
        _use("kernels")
        routed = statistics.mean(float(torch.unique(s[0][4][:M]).numel()) for s in sets)
        fl = roofline(problem, M, ceilings, experts=routed)
        row.update(floor_us=fl.us, bound=fl.bound)
        rows.append(row)
        print(_line(row), flush=True)
        del ref
    del sets
    torch.cuda.empty_cache()
    return rows


def _line(r: dict) -> str:
    t, k, f = r["torch_us"], r["kernels_us"], r["floor_us"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    speed = f"{t / k:.2f}x" if t and k else "-"
    ratio = f"{k / f:.2f}" if k else "-"
    static = ""
    if r.get(f"{ALIGN_OTHER}_us"):
        static += f" {ALIGN_OTHER} {fmt(r[f'{ALIGN_OTHER}_us'])} µs |"
    if r.get("static-fused_us"):
        static += f" static fused act+quant {fmt(r['static-fused_us'])} µs |"
    if r.get("static_us"):
        static += f" static {fmt(r['static_us'])} µs = {r['static_us'] / f:.2f}× floor |"
    return (f"| {r['problem']} TP{r['tp']} | {r['quant']} | {r['M']} | {fmt(t)} | {fmt(k)} | "
            f"{speed} | {fmt(f)} | {ratio} |{static}")  # fmt: skip


def main(argv: list[str]) -> None:
    out = argv[0]
    batch_sizes = [1, 32, 4096] if "--quick" in argv else BATCH_SIZES
    t0 = time.time()
    ceilings = measure_ceilings("cuda")
    print(f"ceilings: {ceilings}", flush=True)
    print("| problem | dtype | M | torch align+act µs | kernels µs | speedup | floor µs | "
          "kernels/floor |\n|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    rows = []
    for name, tp in PROBLEMS:
        for quant in QUANTS:
            try:
                rows += bench_problem(name, tp, quant, ceilings, batch_sizes)
            except Exception as e:  # report and go on with the next problem
                print(f"{name} TP{tp} {quant}: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()
    geo = {}
    for v in list(VARIANTS) + _static_variants(argv):
        ratios = [r[f"{v}_us"] / r["floor_us"] for r in rows if r.get(f"{v}_us")]
        geo[v] = statistics.geometric_mean(ratios) if ratios else None  # static: fp8 rows only
    if "--static" in argv:  # the conditions: bf16 as is, fp8 with static scales
        col = lambda r: "kernels_us" if r["quant"] == "bf16" else "static_us"  # noqa: E731
        ratios = [r[col(r)] / r["floor_us"] for r in rows if r.get(col(r))]
        geo["bf16 + fp8 static"] = statistics.geometric_mean(ratios) if ratios else None
    print(f"geomean time/floor: {geo}  ({time.time() - t0:.0f} s)")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "ceilings": str(ceilings), "geomean_over_floor": geo}  # fmt: skip
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
