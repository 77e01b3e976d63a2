"""`moetune bench`: the op's latency against what a user would otherwise run, and against a floor.

Per batch size the whole op is timed three ways, each checked once against the float64 reference
first (a variant whose check fails reports no timing):

- ``default``: the heuristic config of :mod:`moetune.defaults`;
- ``tuned``: what ``fused_experts(config=None)`` runs, i.e. the tuned table when one is found
  (without one it is the default config, and the result says so);
- ``naive``: :func:`naive_moe`, a plain PyTorch loop over experts, checked against the reference
  of what it computes (dequantized weights, activations not quantized) with 4× the dtype's bound.

The floor comes from :mod:`moetune.roofline`, with ceilings measured on the device itself, so
``tuned / floor`` says how much headroom is left. The interpreter has no ceilings: its rows carry
no floor, and its timings only show that the bench works end to end.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetune.accum import fp8_accum_mode
from moetune.check import check_op, tolerance
from moetune.defaults import default_config
from moetune.inputs import timing_input_sets
from moetune.naive import dequantized_for_naive, naive_moe
from moetune.ops import fused_experts
from moetune.problem import Problem
from moetune.reference import Reference
from moetune.roofline import Ceilings, Floor, floor_us, measure_ceilings, roofline
from moetune.timing import Timing, _quantiles, time_op

__all__ = ["BenchResult", "BenchRow", "Ceilings", "Variant", "floor_us", "measure_ceilings",
           "naive_moe", "run_bench", "save_json", "save_plot"]  # fmt: skip

# The naive loop rounds the router product and each top-k add in the compute dtype where the
# reference rounds once: 4× the op's bound. It skips the activation quantization of w8a8 (it is a
# speed baseline on dequantized weights), so it is checked against the reference of what it
# computes: the same inputs with dequantized weights and no quantization. (Against the quantized
# reference, two e4m3 roundings of the activations put its worst row of thousands past any bound
# that still means something: 0.151 on an H100 for Qwen3 fp8 at M >= 512.)
NAIVE_TOL_FACTOR = 4.0

Progress = Callable[[str], None]
Inputs = tuple[tuple[torch.Tensor, ...], dict[str, Any]]


def syncs_with_host(fn: Callable[[], object]) -> bool:
    """Whether ``fn`` waits on the GPU (``nonzero``, ``.item()``, ...), so a CUDA graph cannot
    capture it. Asked of torch's sync debug mode rather than learnt from a failed capture, which
    leaves the CUDA generator in capture state: any later ``randn`` on the device then fails.
    The debug mode does not see every sync; a capture that still fails is then a failed run."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": known, and said above
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


def time_eager(
    fn: Callable[[int], object], num_sets: int, *, device: torch.device | str, replays: int = 20
) -> Timing:
    """CUDA events around plain calls, for work a graph cannot hold (host syncs): the time a
    caller waits, launch gaps and syncs included."""
    calls = max(num_sets, 4)
    for i in range(num_sets):
        fn(i)
    torch.cuda.synchronize(device)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(start, end, strict=True):
        s.record()
        for i in range(calls):
            fn(i % num_sets)
        e.record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(start, end, strict=True)]
    med, lo, hi = _quantiles(samples)
    return Timing(med, lo, hi, len(samples), "cuda-events")


@dataclass(frozen=True)
class Variant:
    """One way of running the op at one batch size: its check, and its timing if it passed."""

    name: str  # "default", "tuned" or "naive"
    config: dict[str, Any] | None
    ok: bool
    timing: Timing | None = None
    check: dict[str, Any] | None = None
    reason: str = ""
    config_down: dict[str, Any] | None = None  # the down GEMM's, when a _down table gave one

    @property
    def us(self) -> float | None:
        return self.timing.median_us if self.ok and self.timing else None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "us": None if self.us is None else round(self.us, 3),
                "timing": self.timing.as_dict() if self.timing else None,
                "config": self.config, "config_down": self.config_down, "reason": self.reason,
                "check": self.check}  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


@dataclass(frozen=True)
class BenchRow:
    M: int
    default: Variant
    tuned: Variant
    naive: Variant
    floor: Floor | None

    @property
    def ok(self) -> bool:
        return self.default.ok and self.tuned.ok and self.naive.ok

    @property
    def tuned_over_floor(self) -> float | None:
        return _ratio(self.tuned.us, self.floor.us if self.floor else None)

    @property
    def speedup_vs_default(self) -> float | None:
        return _ratio(self.default.us, self.tuned.us)

    @property
    def speedup_vs_naive(self) -> float | None:
        return _ratio(self.naive.us, self.tuned.us)

    def as_dict(self) -> dict[str, Any]:
        return {"M": self.M, "ok": self.ok, "default": self.default.as_dict(),
                "tuned": self.tuned.as_dict(), "naive": self.naive.as_dict(),
                "floor": self.floor.as_dict() if self.floor else None,
                "tuned_over_floor": self.tuned_over_floor,
                "speedup_vs_default": self.speedup_vs_default,
                "speedup_vs_naive": self.speedup_vs_naive}  # fmt: skip


@dataclass(frozen=True)
class BenchResult:
    problem: Problem
    rows: list[BenchRow]
    ceilings: Ceilings
    tuned_source: str  # "table" (a tuned table was found), "default" (none: the heuristic), "given"
    table_path: str | None
    skew: str
    interpreter: bool
    note: str
    provenance: dict[str, Any]
    wall_s: float
    static_scales: bool = False  # w8a8 activations quantized with calibrated static scales

    def as_dict(self) -> dict[str, Any]:
        problem = dataclasses.asdict(self.problem)
        problem["block_shape"] = list(self.problem.block_shape or []) or None
        return {"problem": problem, "skew": self.skew, "static_scales": self.static_scales,
                "interpreter": self.interpreter,
                "note": self.note, "tuned_source": self.tuned_source,
                "table": self.table_path, "ceilings": self.ceilings.as_dict(),
                "provenance": self.provenance, "wall_s": round(self.wall_s, 1),
                "rows": [r.as_dict() for r in self.rows]}  # fmt: skip


def bench_note(interpreter: bool) -> str:
    if interpreter:
        return ("Interpreter run on CPU: timings are Triton-interpreter timings (host clock), not "
                "GPU timings, and no floor exists (the interpreter has no bandwidth or FLOP "
                "ceiling to measure).")  # fmt: skip
    return ("GPU timings: whole op, CUDA-graph replay over rotating input sets, median (the naive "
            "loop syncs with the host: CUDA events without a graph); floor = max(bytes / measured "
            "bandwidth, FLOPs / measured GEMM peak).")  # fmt: skip


def _run_variant(
    name: str,
    config: dict[str, Any] | None,
    run: Callable[[int], object],
    ref: Reference,
    problem: Problem,
    *,
    tol: float | None,
    num_sets: int,
    device: str,
    replays: int,
) -> Variant:
    """Check ``run(0)`` against ``ref`` (:func:`moetune.check.check_op`), then time ``run``; a
    failure is recorded, never raised."""
    cuda = torch.device(device).type == "cuda"
    try:
        dt, quant = problem.torch_dtype, problem.quant
        check = check_op(lambda: run(0), ref, dtype=dt, quant=quant, tol=tol)
        if not check.ok:
            return Variant(name, config, False, check=check.as_dict(),
                           reason=f"check failed: {check.reason}")  # fmt: skip
        if cuda and syncs_with_host(lambda: run(0)):
            timing = time_eager(run, num_sets, device=device, replays=replays)
        else:
            timing = time_op(run, num_sets, device=device, replays=replays)
        return Variant(name, config, True, timing, check.as_dict())
    except Exception as e:  # compile errors, out of resources, launch failures
        if cuda:
            torch.cuda.synchronize(device)
        lines = str(e).strip().splitlines()
        return Variant(
            name, config, False, reason=f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
        )


def _tuned_lookup(
    problem: Problem,
) -> tuple[Callable[[int], dict] | None, Callable[[int], dict] | None, str | None]:
    """The op's own lookup, when a table file exists for the problem on this device: the up
    GEMM's config and the down GEMM's (the up one's unless a ``_down`` table gives another)."""
    from moetune import lookup

    p = problem
    table = lookup.find_table(p.E, p.N, dtype=p.table_dtype, block_shape=p.block_shape)
    if table is None:
        return None, None, None

    def config(M: int, gemm: str = "up") -> dict[str, Any]:
        return lookup.config_for(M, p.E, p.N, p.K, p.topk, dtype=p.torch_dtype, quant=p.quant,
                                 block_shape=p.block_shape, gemm=gemm)  # fmt: skip

    return config, lambda M: config(M, "down"), str(table.path)


def _slice(inputs: Inputs, M: int) -> Inputs:
    (x, w1, w2, tw, ti), kw = inputs
    return (x[:M], w1, w2, tw[:M], ti[:M]), kw


def _bench_one(
    problem: Problem,
    M: int,
    sets: list[Inputs],
    naive_sets: list[Inputs],
    table_config: Callable[[int], dict[str, Any]] | None,
    table_config_down: Callable[[int], dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[Variant, Variant, Variant]:
    ins = [_slice(s, M) for s in sets]
    naive_ins = [_slice(s, M) for s in naive_sets]
    ref = Reference(*ins[0][0], **ins[0][1])

    def fused(config: dict[str, Any], name: str, down: dict[str, Any] | None = None) -> Variant:
        def run(i: int) -> torch.Tensor:
            return fused_experts(*ins[i][0], config=config, config_down=down, **ins[i][1])

        v = _run_variant(name, config, run, ref, problem, tol=None, num_sets=len(ins), **kw)
        return dataclasses.replace(v, config_down=down)

    p = problem
    cfg_default = default_config(M, p.E, p.N, p.K, p.topk, dtype=p.torch_dtype, quant=p.quant,
                                 block_shape=p.block_shape)  # fmt: skip
    default = fused(cfg_default, "default")
    cfg_tuned = table_config(M) if table_config is not None else cfg_default
    cfg_down = table_config_down(M) if table_config_down is not None else None
    if cfg_down == cfg_tuned:  # no _down table: the down GEMM runs the up GEMM's config
        cfg_down = None
    if cfg_tuned == cfg_default and cfg_down in (None, cfg_default):
        tuned = dataclasses.replace(default, name="tuned")  # the same kernels: timed once
    else:
        tuned = fused(cfg_tuned, "tuned", cfg_down)

    def naive_run(i: int) -> torch.Tensor:
        return naive_moe(*naive_ins[i])

    naive_ref = ref if p.quant is None else Reference(*naive_ins[0][0], **naive_ins[0][1])
    tol = NAIVE_TOL_FACTOR * tolerance(p.torch_dtype)
    naive = _run_variant("naive", None, naive_run, naive_ref, problem, tol=tol,
                         num_sets=len(naive_ins), **kw)  # fmt: skip
    return default, tuned, naive


def run_bench(
    problem: Problem,
    batch_sizes: list[int],
    *,
    device: torch.device | str,
    table_config: Callable[[int], dict[str, Any]] | None = None,
    skew: str = "uniform",
    replays: int = 20,
    progress: Progress | None = None,
    static_scales: bool = False,
) -> BenchResult:
    """Check and time default, tuned and naive at each batch size; see the module doc.

    ``table_config(M)`` gives the tuned config (``tuned_source="given"``); None looks the tables
    up as the op does, the down GEMM from a ``_down`` table when there is one (``"table"`` when
    a file is found, else ``"default"``: tuned = default).
    Inputs are drawn once at the largest batch size and sliced, in enough sets to rotate past L2.
    ``static_scales`` (w8a8 problems) gives each set calibrated static activation scales
    (:func:`moetune.inputs.static_activation_scales`), as checkpoints that ship them run.
    """
    from moetune.journal import provenance
    from moetune.platform import detect_platform

    t0 = time.time()
    device = str(device)
    interpreter = torch.device(device).type != "cuda"
    plat = detect_platform()
    source, table_path, table_config_down = "given", None, None
    if table_config is None:
        table_config, table_config_down, table_path = _tuned_lookup(problem)
        source = "table" if table_config is not None else "default"
    ceilings = measure_ceilings(device)

    # Each set also gets a dequantized copy for the naive loop (16-bit: twice an 8-bit set).
    sets = timing_input_sets(problem, max(batch_sizes), device, fp8_dtype=plat.fp8_torch_dtype,
                             skew=skew, budget_share=3 if problem.quant else 2,
                             static_scales=static_scales)  # fmt: skip
    naive_sets = [dequantized_for_naive(*s) for s in sets]
    rows = []
    for M in batch_sizes:
        default, tuned, naive = _bench_one(problem, M, sets, naive_sets, table_config,
                                           table_config_down,
                                           device=device, replays=replays)  # fmt: skip
        floor = None
        if ceilings.available:  # the experts these inputs route to, not their expectation
            routed = [float(torch.unique(s[0][4][:M]).numel()) for s in sets]
            floor = roofline(problem, M, ceilings, experts=sum(routed) / len(routed))
        rows.append(BenchRow(M, default, tuned, naive, floor))
        if progress:
            times = (default.us, tuned.us, naive.us, floor.us if floor else None)
            progress(f"M={M}: default, tuned, naive, floor µs: {', '.join(map(_fmt, times))}")
    prov = provenance(plat.device_name, interpreter)
    if problem.quant == "fp8_w8a8":
        prov["fp8_accum"] = fp8_accum_mode()  # the op's mode for every timing above
    return BenchResult(problem, rows, ceilings, source, table_path, skew, interpreter,
                       bench_note(interpreter), prov, time.time() - t0,
                       static_scales)  # fmt: skip


def _fmt(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def bench_name(
    problem: Problem, device_name: str, skew: str = "uniform", static_scales: bool = False
) -> str:
    """File stem of a bench's outputs: device, problem, routing skew, static scales."""
    extra = ([skew] if skew != "uniform" else []) + (["static"] if static_scales else [])
    return "-".join([device_name, problem.slug(), *extra])


def save_json(result: BenchResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.as_dict(), indent=1, allow_nan=False) + "\n")
    return path


def save_plot(result: BenchResult, path: Path) -> bool:
    """Log-log latency against batch size: default, tuned, naive and the floor. False (nothing
    written) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    # default underneath, wide and pale, so a tuned curve equal to it still shows both.
    curves = [("default", "tab:blue", "o", 4.0, 0.45), ("tuned", "tab:green", "s", 1.5, 1.0),
              ("naive", "tab:red", "^", 1.5, 1.0)]  # fmt: skip
    for name, color, marker, width, alpha in curves:
        pts = [(r.M, getattr(r, name).us) for r in result.rows if getattr(r, name).us]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, color=color, lw=width, alpha=alpha,
                    label=name)  # fmt: skip
    floor = [(r.M, r.floor.us) for r in result.rows if r.floor]
    if floor:
        ax.plot(*zip(*floor, strict=True), "k--", label="floor (roofline)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("batch size M (tokens)")
    ax.set_ylabel("latency per call (µs)")
    device = result.provenance.get("gpu") or result.provenance.get("device_name", "")
    where = "Triton interpreter: host-clock timings, no floor" if result.interpreter else device
    scales = ", static activation scales" if result.static_scales else ""
    ax.set_title(f"{result.problem.describe()}, {result.skew} routing{scales}\n{where}",
                 fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True
