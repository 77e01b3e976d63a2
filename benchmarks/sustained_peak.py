"""Burst peak against sustained peak: what a compute-bound op can reach on a power-capped GPU.

The floor's FLOP/s ceiling (``moetune.roofline.measure_ceilings``) comes from ten 8192³ GEMMs
after three warm-up runs: a few tens of milliseconds, too short for the card to reach its
power cap. A compute-bound op timed for seconds (a sweep's finalists, ``moetune bench``) runs
at whatever clock the cap allows. This measures both, on the same card, in one process:

1. the burst ceilings, as the floor measures them;
2. the same bf16 GEMM run back to back for ``--seconds``, timed in chunks of ``--chunk`` runs;
3. the op (a preset at one batch size, the config the runtime looks up), checked against the
   float64 reference, then replayed from a CUDA graph for ``--seconds``, in the same chunks.

Each chunk's TFLOP/s sits beside the SM clock and board power ``nvidia-smi`` logged during it
(power is the driver's running average, so it lags), and the last second of each run shows
the steady state. The op's sustained TFLOP/s over the
GEMM's sustained TFLOP/s is how far the kernel is from the tensor cores at the clock both ran at.

Usage: python benchmarks/sustained_peak.py OUT.json [--model Mixtral-8x7B --tp 2 --m 4096]
       [--quant fp8_w8a8] [--seconds 8] [--chunk 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import smi_log
import torch

from moetune.check import check_op
from moetune.inputs import timing_input_sets
from moetune.ops import fused_experts
from moetune.presets import preset_problem
from moetune.reference import Reference
from moetune.roofline import MATMUL_SIZE, measure_ceilings, moe_flops


def sustained(fn, flops: float, seconds: float, chunk: int) -> list[dict]:
    """Run ``fn`` back to back for ``seconds``; per chunk of ``chunk`` calls: wall-clock start
    and end, µs per call (CUDA events) and TFLOP/s."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    rows = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        t0 = time.time()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(chunk):
            fn()
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) * 1e3 / chunk
        rows.append({"t0": t0, "t": time.time(), "us": us, "tflops": flops / us / 1e6})
    return rows


def _attach_clocks(rows: list[dict], samples: list[tuple[float, float, float]]) -> None:
    for r in rows:
        inside = [s for s in samples if r["t0"] <= s[0] <= r["t"]]
        if not inside and samples:  # a chunk shorter than the log's period: the nearest sample
            inside = [min(samples, key=lambda s: abs(s[0] - r["t"]))]
        r["sm_mhz"] = statistics.median(s[1] for s in inside) if inside else None
        r["power_w"] = statistics.median(s[2] for s in inside) if inside else None


def _summary(name: str, rows: list[dict]) -> dict:
    last = [r for r in rows if r["t"] >= rows[-1]["t"] - 1.0]  # the last second: steady state
    clocks = [r["sm_mhz"] for r in last if r["sm_mhz"] is not None]
    power = [r["power_w"] for r in last if r["power_w"] is not None]
    out = {
        "name": name,
        "first_chunk_tflops": rows[0]["tflops"],
        "last_second_tflops": statistics.median(r["tflops"] for r in last),
        "last_second_sm_mhz": statistics.median(clocks) if clocks else None,
        "last_second_power_w": statistics.median(power) if power else None,
        "chunks": len(rows),
    }
    print(f"{name:<34} first chunk {out['first_chunk_tflops']:6.1f} TFLOP/s, last second "
          f"{out['last_second_tflops']:6.1f} TFLOP/s at {out['last_second_sm_mhz']} MHz, "
          f"{out['last_second_power_w']} W", flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="Mixtral-8x7B")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--chunk", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("Error: sustained_peak.py needs a GPU")
    ceilings = measure_ceilings("cuda")
    burst = ceilings.bf16_flops / 1e12
    print(f"{torch.cuda.get_device_name()}: burst ceilings {ceilings}", flush=True)
    time.sleep(5)  # let the card cool to its idle clock between the burst and the runs

    n = MATMUL_SIZE
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    z = torch.empty_like(x)
    log = smi_log.start()
    gemm = sustained(lambda: torch.mm(x, y, out=z), 2.0 * n**3, a.seconds, a.chunk)
    _attach_clocks(gemm, smi_log.samples(log))
    time.sleep(5)

    problem = preset_problem(a.model, a.tp)
    if a.quant:
        from dataclasses import replace

        problem = replace(problem, quant=a.quant)
    sets = timing_input_sets(problem, a.m, "cuda")
    args, kw = sets[0]
    ref = Reference(*args, **kw)
    check = check_op(lambda: fused_experts(*args, **kw), ref, dtype=problem.torch_dtype,
                     quant=problem.quant)  # fmt: skip
    if not check.ok:
        raise SystemExit(f"Error: the op fails its check: {check.reason}")
    del ref
    graph = torch.cuda.CUDAGraph()
    fused_experts(*args, **kw)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        fused_experts(*args, **kw)
    log = smi_log.start()
    op = sustained(graph.replay, moe_flops(problem, a.m), a.seconds, a.chunk)
    _attach_clocks(op, smi_log.samples(log))

    results = [_summary("bf16 GEMM 8192^3", gemm),
               _summary(f"op {problem.describe()} M={a.m}", op)]  # fmt: skip
    ratio = results[1]["last_second_tflops"] / results[0]["last_second_tflops"]
    print(f"burst bf16 ceiling {burst:.1f} TFLOP/s (the floor's); sustained GEMM "
          f"{results[0]['last_second_tflops']:.1f} ({results[0]['last_second_tflops'] / burst:.2f}"
          f" of burst); op/GEMM sustained {ratio:.2f}")  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "ceilings": str(ceilings),
                   "burst_bf16_tflops": burst, "summary": results, "ratio_op_to_gemm": ratio,
                   "gemm_chunks": gemm, "op_chunks": op, "problem": problem.describe(),
                   "M": a.m}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
