"""The op's variants timed in alternation, chunk by chunk, at compute-bound batch sizes.

At prefill sizes a power-capped card's clock falls within a second of sustained work
(results/kernels/NOTES.md §21), so two variants timed one after the other (kernel_breakdown's
``--compare``: two rounds) can differ by more than the change being measured: Mixtral bf16 at
M=4096 read 2,746 and 2,566 µs in two runs on one H100 with the same config. Here each variant
(``kernel_breakdown.VARIANTS``) is checked against the float64 reference, captured in a CUDA
graph, and then the graphs are replayed in alternation for ``--seconds``: ``--chunk`` calls of
one, then of the next (the order reversed every round), so every variant sees the same thermal
state. Reported per variant: the median µs per call over the chunks, and the median of the
per-round ratios first ÷ variant (above 1: faster than the first variant that passed); with
``--profile`` also each kernel's µs per replay of its graph (torch.profiler, the variants
again in alternation).

One input set per point (no rotation): at these sizes the weights are far larger than L2.

Usage: python benchmarks/ab_interleaved.py OUT.json --variants auto,auto-sorted-in
       [--problems Mixtral-8x7B,gpt-oss-120b] [--quants bf16,fp8_w8a8] [--m 2048,4096]
       [--seconds 4] [--chunk 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from kernel_breakdown import DEFAULTS, NATIVE_PROBLEMS, PROBLEMS, VARIANTS, _use, breakdown

from moetune import ops
from moetune.check import check_op
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.lookup import config_for
from moetune.platform import detect_platform
from moetune.presets import preset_problem
from moetune.reference import Reference
from moetune.roofline import measure_ceilings, roofline


def interleave(graphs: dict[str, torch.cuda.CUDAGraph], seconds: float, chunk: int) -> dict:
    """Replay each graph ``chunk`` times in turn until ``seconds`` pass; µs per call per chunk."""
    names = list(graphs)
    for g in graphs.values():  # one warm-up replay each
        g.replay()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    end, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < end or rounds < 2:
        for name in names if rounds % 2 == 0 else names[::-1]:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(chunk):
                graphs[name].replay()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop) * 1e3 / chunk)
        rounds += 1
    return times


def kernels_interleaved(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int = 2) -> dict:
    """Each graph's kernels, µs per replay (torch.profiler over replays), in alternation as
    the timing: the mean over ``rounds`` rounds, the order reversed every round."""
    names = list(graphs)
    per: dict[str, dict[str, float]] = {n: {} for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            kernels, _ = breakdown(lambda i, g=graphs[name]: g.replay(), 1)
            for k, us in kernels.items():
                per[name][k] = per[name].get(k, 0.0) + us / rounds
    return per


def measure_point(name: str, problem, args, kws, M: int, variants: list[str], a, ceilings) -> dict:
    """One problem at one batch size: each variant checked and captured, then interleaved."""
    quant, block = problem.quant, problem.block_shape
    cfg = config_for(M, problem.E, problem.N, problem.K, problem.topk, dtype=problem.torch_dtype,
                     quant=quant, block_shape=block)  # fmt: skip
    ref = Reference(*args, **kws)
    row: dict = {"problem": name, "quant": "fp8block" if block else quant or "bf16",
                 "M": M, "config": cfg}  # fmt: skip
    graphs = {}

    def run():
        return ops.fused_experts(*args, config=cfg, **kws)

    try:
        for v in variants:
            _use(VARIANTS[v])
            try:
                chk = check_op(run, ref, dtype=problem.torch_dtype, quant=quant)
            except Exception as e:  # a variant that does not compile or run: the others go on
                row[f"{v}_ok"], row[f"{v}_error"] = False, f"{type(e).__name__}: {e}"[:2000]
                print(f"{v}: {row[f'{v}_error'][:300]}", flush=True)
                continue
            row[f"{v}_ok"] = chk.ok
            if not chk.ok:
                continue
            run()
            torch.cuda.synchronize()
            graphs[v] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[v]):
                run()
    finally:
        _use(DEFAULTS)
    del ref
    times = interleave(graphs, a.seconds, a.chunk)
    if a.profile:
        for v, kernels in kernels_interleaved(graphs).items():
            row[f"{v}_kernels"] = kernels
    first = next(iter(times.values()), None)  # the first variant that passed its check
    experts = float(torch.unique(args[4]).numel())  # the experts routed to
    row["floor_us"] = roofline(problem, M, ceilings, experts=experts).us
    for v, ts in times.items():
        row[f"{v}_us"] = statistics.median(ts)
        row[f"{v}_chunks_us"] = ts
        if first is not None:
            row[f"{v}_vs_first"] = statistics.median(f / t for f, t in zip(first, ts, strict=True))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variants", required=True)
    ap.add_argument("--problems", default="Mixtral-8x7B,Qwen3-30B-A3B,gpt-oss-120b")
    ap.add_argument("--quants", default="bf16,fp8_w8a8")
    ap.add_argument("--m", default="2048,4096")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--chunk", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="each variant's kernels too")
    a = ap.parse_args()
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if len(variants) < 2 or unknown:
        raise SystemExit(f"Error: --variants takes two or more of {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("Error: ab_interleaved.py needs a GPU")
    ceilings = measure_ceilings("cuda")
    print(f"{torch.cuda.get_device_name()}; ceilings: {ceilings}", flush=True)
    fp8 = detect_platform().fp8_torch_dtype
    ms = [int(m) for m in a.m.split(",")]
    rows = []
    for name, tp in PROBLEMS + NATIVE_PROBLEMS:
        if name not in a.problems.split(","):
            continue
        native = (name, tp) in NATIVE_PROBLEMS
        for q in ["native"] if native else a.quants.split(","):
            quant = {"native": "default", "bf16": None}.get(q, q)  # "default": its own
            problem = preset_problem(name, tp, quant=quant)
            (x, w1, w2, tw, ti), kw = timing_input_sets(problem, max(ms), "cuda", fp8_dtype=fp8)[0]
            for M in ms:
                args = (x[:M], w1, w2, tw[:M], ti[:M])
                kws = dict(kw)
                if problem.quant and problem.block_shape is None:
                    kws.update(static_activation_scales(args, kws))
                row = measure_point(name, problem, args, kws, M, variants, a, ceilings)
                rows.append(row)
                timed = [v for v in variants if f"{v}_us" in row]
                cells = "  ".join(
                    f"{v} {row[f'{v}_us']:8.1f} ({row.get(f'{v}_vs_first', 0):.3f}x)" for v in timed
                )
                print(f"{name[:8]} {row['quant']:>8} M={M:<5} {cells}", flush=True)
                torch.cuda.empty_cache()
                # after every point, so a run cut short by its time limit keeps what it measured
                with open(a.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "variants": variants,
                               "seconds": a.seconds, "chunk": a.chunk, "rows": rows}, f,
                              indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
