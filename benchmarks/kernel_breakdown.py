"""Where the op's time goes: each kernel's GPU time per call beside the CUDA-graph time.

For the three reference problems (bf16, and fp8_w8a8 with calibrated static activation scales,
issue 5's conditions), each with the config the runtime looks up on this GPU, at a few batch
sizes: the op is checked against the float64 reference (``check_op``, as sweeps and ``bench``
check), timed by CUDA-graph replay over rotating input sets (weights cold in L2, as ``moetune
bench`` does), then run eagerly under ``torch.profiler`` over the same sets. The kernels'
durations are summed by name and divided by the number of calls. ``graph − Σ kernels`` is what
the graph spends between kernels (launch latency of dependent kernels, ramp-up and tail).

``--compare`` times each point twice more per variant, interleaved (unfused, fused, unfused,
fused: large-M timings drift with the order of measurement, results/kernels/NOTES.md §8):
``unfused`` with GEMM1 writing ``[slots, 2N]`` and the activation kernel after it, ``fused`` with
the activation in GEMM1's epilogue at every M (``ops.FUSE_GEMM1_ACTIVATION``), and with
``--variants`` also ``fused-pairs`` (silu's gate and up rows interleaved in the tile,
``launch.SILU_PAIRS``; the same as ``fused`` for swigluoai), ``auto`` (the op's default:
fused, except static fp8 above ``ops.FUSE_GEMM1_STATIC_FP8_MAX_M`` tokens) and ``auto-sum``
(``auto`` with the sum over top-k in GEMM2's epilogue at every M, ``ops.SUM_TOPK_IN_GEMM2_MIN_M``
= 1: fp32 atomic adds instead of the ``[slots, K]`` store and torch's reduce) and ``auto-rq``
(``auto`` with ``ops.QUANTIZE_IN_ROUTING`` switched: the input's static fp8 quantization in the
routing launch at decode sizes, or in its own launch) and ``auto-ts`` (``auto`` with
``ops.TOPK_SUM_KERNEL`` switched: the sum over top-k in moetune's Triton kernel or PyTorch's
reduce), ``auto-pairs`` (``launch.SILU_PAIRS`` switched) and ``auto-tma`` (``launch.WEIGHTS_TMA``
switched: the weights' tiles through TMA descriptors, with silu's pairs tile) and ``auto-bound``
(``align.TIGHT_BOUND`` switched: the routing's padding bounded by every expert, or by those that
can hold a slot). Each variant's
output is checked first; ``speedup`` is the first variant's median over the second's,
``<variant>_vs_first`` each variant's against the first.

Each row is also appended to ``OUT.jsonl`` as soon as it is measured.

Usage: python benchmarks/kernel_breakdown.py OUT.json [--m 1,8,32,512,4096] [--problems a,b]
       [--quants bf16,fp8_w8a8]
       [--compare [--variants unfused,fused,fused-pairs,auto,auto-sum,auto-rq,auto-ts,auto-pairs,
       auto-tma,auto-bound,auto-bs,auto-gq,auto-direct,
       auto-pdl,auto-pdl-early,auto-pdl-late,auto-pdl1,auto-sorted,auto-sorted-ptr,
       auto-sorted-in,auto-unsorted,auto-ranked,auto-tile0]]
A problem of NATIVE_PROBLEMS (e.g. --problems Qwen3-30B-A3B-FP8) runs in its checkpoint's own
quantization (block fp8 with dynamic activation scales); ``auto-bs`` switches
``launch.BLOCK_SCALE_PER_TILE`` (one weight scale per tile and K step where the tile's columns
share an N-group, or a gathered vector); ``auto-gq`` switches ``quant_kernel.GROUP_ROWS_KERNEL``
(the dynamic per-group activation scales from programs of many rows, or of one row and group);
``auto-direct`` switches ``ops.DIRECT_SLOTS_MAX_M`` (one token's slots straight from topk_ids,
or the routing launch); ``auto-pdl`` switches ``launch.PDL`` (GEMM2 and
the sum over top-k as programmatic dependent launches; ``auto-pdl-early`` and ``auto-pdl-late``
with the GEMMs' trigger at their programs' start or after their K loop); ``auto-pdl1``
switches ``launch.PDL_GEMM1`` (GEMM1 as a dependent of the op's routing or quantization
launch); ``auto-sorted`` sets ``ops.SORTED_MIN_M`` to 1 (GEMM1's output at the routing's
sorted positions, GEMM2 reading contiguous blocks through TMA; ``auto-sorted-ptr`` the same
with pointer loads, ``launch.SORTED_TMA`` off), ``auto-sorted-in`` also
``ops.SORTED_INPUT_MIN_M`` (the input gathered into sorted positions for GEMM1);
``auto-unsorted`` turns off ``ops.SORTED_AUTO_MIN_M``'s rule (both of those for unquantized
ops of top-k <= 2 from 1,024 tokens where the rows load through TMA; every other variant keeps
it, so from there ``auto``, ``auto-sorted`` and ``auto-sorted-in`` are one op for such a
problem);
``auto-ranked`` switches ``align_kernel.RANKED_DEFAULT`` (past one program's slots, the routing
in two launches that rank sorted chunks, or in three with atomic counters); ``auto-tile0``
the activation kernel's tile as before §27 (one row of 1,024 columns, two strided loads for
swiglu's pairs, no narrower block for a better fit). Each
variant that passed its check is also profiled (``<variant>_kernels``). A kernel launched
more than once a call (the two GEMMs) is reported per launch, ``name#1`` first.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

from moetune import activation, align, align_kernel, launch, ops, quant_kernel
from moetune.check import check_op
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.lookup import config_for
from moetune.platform import detect_platform
from moetune.presets import preset_problem
from moetune.reference import Reference
from moetune.roofline import measure_ceilings, roofline
from moetune.timing import time_op

PROBLEMS = [("Mixtral-8x7B", 2), ("Qwen3-30B-A3B", 2), ("gpt-oss-120b", 1)]
# Checkpoints with their own quantization (block fp8, dynamic activation scales): only with
# --problems, and then in that quantization alone (--quants does not apply).
NATIVE_PROBLEMS = [("Qwen3-30B-A3B-FP8", 2), ("Qwen3-235B-A22B-FP8", 8)]
QUANTS = [None, "fp8_w8a8"]
PROFILED_CALLS = 24


class Flags(NamedTuple):
    """The op's module flags a variant sets (each field names its flag)."""

    fuse_gemm1_activation: bool  # ops.FUSE_GEMM1_ACTIVATION
    silu_pairs: bool  # launch.SILU_PAIRS
    fuse_gemm1_static_fp8_max_m: int | None  # ops.FUSE_GEMM1_STATIC_FP8_MAX_M
    sum_topk_in_gemm2_min_m: int | None  # ops.SUM_TOPK_IN_GEMM2_MIN_M
    quantize_in_routing: bool  # ops.QUANTIZE_IN_ROUTING
    topk_sum_kernel: bool  # ops.TOPK_SUM_KERNEL
    weights_tma: bool = launch.WEIGHTS_TMA  # launch.WEIGHTS_TMA
    tight_bound: bool = align.TIGHT_BOUND  # align.TIGHT_BOUND
    block_scale_per_tile: bool = launch.BLOCK_SCALE_PER_TILE  # launch.BLOCK_SCALE_PER_TILE
    group_rows_kernel: bool = quant_kernel.GROUP_ROWS_KERNEL  # quant_kernel.GROUP_ROWS_KERNEL
    direct_slots_max_m: int | None = ops.DIRECT_SLOTS_MAX_M  # ops.DIRECT_SLOTS_MAX_M
    pdl: bool = launch.PDL  # launch.PDL
    pdl_trigger: str = launch.PDL_TRIGGER  # launch.PDL_TRIGGER
    pdl_gemm1: bool = launch.PDL_GEMM1  # launch.PDL_GEMM1
    sorted_min_m: int | None = ops.SORTED_MIN_M  # ops.SORTED_MIN_M
    sorted_input_min_m: int | None = ops.SORTED_INPUT_MIN_M  # ops.SORTED_INPUT_MIN_M
    sorted_tma: bool = launch.SORTED_TMA  # launch.SORTED_TMA
    ranked_routing: bool = align_kernel.RANKED_DEFAULT  # align_kernel.RANKED_DEFAULT
    act_tile: activation.Tile = activation.TILE  # activation.TILE
    act_fit_block: bool = activation.FIT_BLOCK  # activation.FIT_BLOCK
    sorted_auto_min_m: int | None = ops.SORTED_AUTO_MIN_M  # ops.SORTED_AUTO_MIN_M


DEFAULTS = Flags(
    ops.FUSE_GEMM1_ACTIVATION,
    launch.SILU_PAIRS,
    ops.FUSE_GEMM1_STATIC_FP8_MAX_M,
    ops.SUM_TOPK_IN_GEMM2_MIN_M,
    ops.QUANTIZE_IN_ROUTING,
    ops.TOPK_SUM_KERNEL,
    launch.WEIGHTS_TMA,
    align.TIGHT_BOUND,
    launch.BLOCK_SCALE_PER_TILE,
    quant_kernel.GROUP_ROWS_KERNEL,
    ops.DIRECT_SLOTS_MAX_M,
    launch.PDL,
    launch.PDL_TRIGGER,
    launch.PDL_GEMM1,
    ops.SORTED_MIN_M,
    ops.SORTED_INPUT_MIN_M,
    launch.SORTED_TMA,
    align_kernel.RANKED_DEFAULT,
    activation.TILE,
    activation.FIT_BLOCK,
    ops.SORTED_AUTO_MIN_M,
)
# "auto" is the op's default: fused, except static fp8 above the limit; "auto-sum" adds the sum
# over top-k in GEMM2 at every M; "auto-rq" switches the input's static fp8 quantization in
# the routing launch (ops.QUANTIZE_IN_ROUTING) to the other setting; "auto-ts" switches the
# sum over top-k between moetune's kernel and PyTorch's reduce (ops.TOPK_SUM_KERNEL); "auto-pairs"
# switches launch.SILU_PAIRS (with WEIGHTS_TMA on, only tiles below its 64 rows change),
# "auto-tma" the weights' TMA loads (launch.WEIGHTS_TMA, which takes silu's pairs tile with
# it) and "auto-bound" the routing's padding bound (align.TIGHT_BOUND). The others store GEMM2's
# slot rows, quantize the input in its own launch and sum in PyTorch, as the op did before.
VARIANTS = {
    "unfused": Flags(False, False, None, None, False, False),
    "fused": Flags(True, False, None, None, False, False),
    "fused-pairs": Flags(True, True, None, None, False, False),
    "auto": DEFAULTS,
    "auto-sum": DEFAULTS._replace(sum_topk_in_gemm2_min_m=1),
    "auto-rq": DEFAULTS._replace(quantize_in_routing=not ops.QUANTIZE_IN_ROUTING),
    "auto-ts": DEFAULTS._replace(topk_sum_kernel=not ops.TOPK_SUM_KERNEL),
    "auto-pairs": DEFAULTS._replace(silu_pairs=not launch.SILU_PAIRS),
    "auto-tma": DEFAULTS._replace(weights_tma=not launch.WEIGHTS_TMA),
    "auto-bound": DEFAULTS._replace(tight_bound=not align.TIGHT_BOUND),
    "auto-bs": DEFAULTS._replace(block_scale_per_tile=not launch.BLOCK_SCALE_PER_TILE),
    "auto-gq": DEFAULTS._replace(group_rows_kernel=not quant_kernel.GROUP_ROWS_KERNEL),
    "auto-direct": DEFAULTS._replace(
        direct_slots_max_m=None if ops.DIRECT_SLOTS_MAX_M is not None else 1
    ),
    "auto-pdl": DEFAULTS._replace(pdl=not launch.PDL),
    "auto-pdl-early": DEFAULTS._replace(pdl=True, pdl_trigger="early"),
    "auto-pdl-late": DEFAULTS._replace(pdl=True, pdl_trigger="late"),
    "auto-pdl1": DEFAULTS._replace(pdl_gemm1=not launch.PDL_GEMM1),
    "auto-sorted": DEFAULTS._replace(sorted_min_m=1),
    "auto-sorted-ptr": DEFAULTS._replace(sorted_min_m=1, sorted_tma=False),
    "auto-sorted-in": DEFAULTS._replace(sorted_min_m=1, sorted_input_min_m=1),
    "auto-unsorted": DEFAULTS._replace(sorted_auto_min_m=None),
    "auto-ranked": DEFAULTS._replace(ranked_routing=not align_kernel.RANKED_DEFAULT),
    "auto-tile0": DEFAULTS._replace(
        act_tile=activation.Tile(1, activation.MAX_BLOCK, 4, False), act_fit_block=False
    ),
}


def _short(name: str) -> str:
    """A kernel's name without template arguments (Triton names are already short)."""
    return name.split("<")[0].split("(")[0][:48]


def breakdown(run, n_sets: int) -> tuple[dict[str, float], float]:
    """µs per call of each kernel name, and kernels per call, over PROFILED_CALLS eager calls."""
    for i in range(n_sets):
        run(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(PROFILED_CALLS):
            run(i % n_sets)
        torch.cuda.synchronize()
    events = sorted(
        (ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda ev: ev.time_range.start,
    )
    # A name launched k times a call (the two GEMMs) is reported per launch: name#1 .. name#k.
    calls_of = defaultdict(int)
    for ev in events:
        calls_of[_short(ev.name)] += 1
    seen: dict[str, int] = defaultdict(int)
    per: dict[str, float] = defaultdict(float)
    for ev in events:
        name = label = _short(ev.name)
        k = calls_of[name] // PROFILED_CALLS
        if k > 1 and calls_of[name] % PROFILED_CALLS == 0:
            label = f"{name}#{seen[name] % k + 1}"
            seen[name] += 1
        elif k > 1:  # launches not a whole number a call: their sum, under the plain name
            label = f"{name} (all launches)"
        per[label] += ev.time_range.elapsed_us() / PROFILED_CALLS
    return dict(sorted(per.items(), key=lambda kv: -kv[1])), len(events) / PROFILED_CALLS


def _use(flags: Flags) -> None:
    ops.FUSE_GEMM1_ACTIVATION = flags.fuse_gemm1_activation
    launch.SILU_PAIRS = flags.silu_pairs
    ops.FUSE_GEMM1_STATIC_FP8_MAX_M = flags.fuse_gemm1_static_fp8_max_m
    ops.SUM_TOPK_IN_GEMM2_MIN_M = flags.sum_topk_in_gemm2_min_m
    ops.QUANTIZE_IN_ROUTING = flags.quantize_in_routing
    ops.TOPK_SUM_KERNEL = flags.topk_sum_kernel
    launch.WEIGHTS_TMA = flags.weights_tma
    align.TIGHT_BOUND = flags.tight_bound
    launch.BLOCK_SCALE_PER_TILE = flags.block_scale_per_tile
    quant_kernel.GROUP_ROWS_KERNEL = flags.group_rows_kernel
    ops.DIRECT_SLOTS_MAX_M = flags.direct_slots_max_m
    launch.PDL = flags.pdl
    launch.PDL_TRIGGER = flags.pdl_trigger
    launch.PDL_GEMM1 = flags.pdl_gemm1
    ops.SORTED_MIN_M = flags.sorted_min_m
    ops.SORTED_INPUT_MIN_M = flags.sorted_input_min_m
    launch.SORTED_TMA = flags.sorted_tma
    align_kernel.RANKED_DEFAULT = flags.ranked_routing
    activation.TILE = flags.act_tile
    activation.FIT_BLOCK = flags.act_fit_block
    ops.SORTED_AUTO_MIN_M = flags.sorted_auto_min_m


def compare(run, n_sets: int, ref: Reference, dtype, quant, variants: list[str]) -> dict:
    """Every variant checked (an error is recorded as a failed check), then those that passed
    timed twice each, interleaved (a, b, c, a, b, c). The op's defaults are restored after."""
    out: dict = {}
    try:
        for name in variants:
            _use(VARIANTS[name])
            try:
                chk = check_op(lambda: run(0), ref, dtype=dtype, quant=quant)
                out[f"{name}_ok"], out[f"{name}_rel_err"] = chk.ok, chk.worst_row_err
            except Exception as e:  # a variant that does not compile or run: the others go on
                out[f"{name}_ok"], out[f"{name}_rel_err"] = False, f"{type(e).__name__}: {e}"
        passed = [name for name in variants if out[f"{name}_ok"]]
        times: dict[str, list[float]] = {name: [] for name in passed}
        for name in passed * 2:
            _use(VARIANTS[name])
            times[name].append(time_op(run, n_sets, device="cuda", replays=20).median_us)
        for name in passed:  # where each variant's time goes, kernel by kernel
            _use(VARIANTS[name])
            out[f"{name}_kernels"] = breakdown(run, n_sets)[0]
    finally:
        _use(DEFAULTS)
    for name, ts in times.items():
        out[f"{name}_us"] = statistics.median(ts)
        out[f"{name}_runs_us"] = ts
        out[f"{name}_vs_first"] = out[f"{passed[0]}_us"] / out[f"{name}_us"]
    if passed[:2] == variants[:2]:
        out["speedup"] = out[f"{variants[0]}_us"] / out[f"{variants[1]}_us"]
    return out


def bench_problem(name: str, tp: int, quant: str | None, ceilings, batch_sizes, sink) -> None:
    """Each batch size's row is printed and written to ``sink`` (a JSON line) as it is done."""
    problem = preset_problem(name, tp, quant=quant)
    quant, block = problem.quant, problem.block_shape  # a native problem's own
    label = "fp8block" if block else (quant or "bf16")
    fp8 = detect_platform().fp8_torch_dtype
    sets = timing_input_sets(problem, max(batch_sizes), "cuda", fp8_dtype=fp8)
    for M in batch_sizes:
        ins = [((x[:M], w1, w2, tw[:M], ti[:M]), kw) for (x, w1, w2, tw, ti), kw in sets]
        if quant and block is None:  # block scales are dynamic
            ins = [(a, {**k, **static_activation_scales(a, k)}) for a, k in ins]
        cfg = config_for(M, problem.E, problem.N, problem.K, problem.topk,
                         dtype=problem.torch_dtype, quant=quant, block_shape=block)  # fmt: skip

        def run(i: int, ins=ins, cfg=cfg) -> torch.Tensor:
            return ops.fused_experts(*ins[i][0], config=cfg, **ins[i][1])

        ref = Reference(*ins[0][0], **ins[0][1])
        chk = check_op(lambda: run(0), ref, dtype=problem.torch_dtype, quant=quant)
        row = {"problem": name, "tp": tp, "quant": label, "M": M, "config": cfg,
               "ok": chk.ok, "rel_err": chk.worst_row_err}  # fmt: skip
        if chk.ok:
            row["graph_us"] = time_op(run, len(ins), device="cuda", replays=20).median_us
            row["kernels"], row["launches"] = breakdown(run, len(ins))
            row["sum_kernels_us"] = sum(row["kernels"].values())
        if "--compare" in sys.argv:
            row.update(compare(run, len(ins), ref, problem.torch_dtype, quant, _variants()))
        del ref
        routed = statistics.mean(float(torch.unique(s[0][4][:M]).numel()) for s in sets)
        fl = roofline(problem, M, ceilings, experts=routed)
        row.update(floor_us=fl.us, bound=fl.bound)
        sink.write(json.dumps(row, default=str) + "\n")
        sink.flush()
        print(_line(row), flush=True)
    del sets
    torch.cuda.empty_cache()


def _variants() -> list[str]:
    """The --variants list (default: unfused, fused); unknown names are refused."""
    names = ["unfused", "fused"]
    if "--variants" in sys.argv:
        names = sys.argv[sys.argv.index("--variants") + 1].split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or len(names) < 2:
        sys.exit(f"Error: --variants takes two or more of {', '.join(VARIANTS)}, got {names}")
    return names


def _line(r: dict) -> str:
    head = f"{r['problem']} TP{r['tp']} {r['quant']} M={r['M']}"
    if not r["ok"]:
        return f"{head}: CHECK FAILED rel_err {r['rel_err']}"
    g, s, f = r["graph_us"], r["sum_kernels_us"], r["floor_us"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["kernels"].items())
    cmp = ""
    timed = [n for n in VARIANTS if f"{n}_us" in r]
    failed = [n for n in VARIANTS if r.get(f"{n}_ok") is False]
    parts_cmp = [
        f"{n} {r[f'{n}_us']:.1f} µs ({r[f'{n}_vs_first']:.3f}×, /floor {r[f'{n}_us'] / f:.2f})"
        for n in timed
    ] + [f"{n} CHECK FAILED {r[f'{n}_rel_err']}" for n in failed]
    if parts_cmp:
        cmp = " | " + ", ".join(parts_cmp)
    return (f"{head}: graph {g:.1f} µs, {r['launches']:g} kernels Σ {s:.1f}, between {g - s:.1f}, "
            f"floor {f:.1f} ({g / f:.2f}×){cmp} | {parts}")  # fmt: skip


def main(argv: list[str]) -> None:
    out = argv[0]
    ms = [1, 8, 32, 512, 4096]
    names = [p for p, _ in PROBLEMS]
    quants = list(QUANTS)
    for i, a in enumerate(argv):
        if a == "--m":
            ms = [int(v) for v in argv[i + 1].split(",")]
        if a == "--problems":
            names = argv[i + 1].split(",")
        if a == "--quants":  # e.g. fp8_w8a8 (bf16: none)
            quants = [None if q == "bf16" else q for q in argv[i + 1].split(",")]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        sys.exit(f"Error: --quants takes bf16 and fp8_w8a8, got {unknown}")
    ceilings = measure_ceilings("cuda")
    print(f"{torch.cuda.get_device_name()}; ceilings: {ceilings}", flush=True)
    # Rows go to OUT.jsonl as they are measured (a run cut by a timeout keeps them), then OUT.
    with open(out + "l", "w") as sink:
        for name, tp in PROBLEMS + NATIVE_PROBLEMS:
            if name not in names:
                continue
            native = (name, tp) in NATIVE_PROBLEMS
            for quant in ["default"] if native else quants:
                try:
                    bench_problem(name, tp, quant, ceilings, ms, sink)
                except Exception as e:  # report and go on with the next problem
                    print(f"{name} TP{tp} {quant}: {type(e).__name__}: {e}", flush=True)
                    torch.cuda.empty_cache()
    with open(out + "l") as f:
        rows = [json.loads(line) for line in f]
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "ceilings": str(ceilings),
            "variants": ({n: VARIANTS[n]._asdict() for n in _variants()}
                         if "--compare" in argv else None)}  # fmt: skip
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
