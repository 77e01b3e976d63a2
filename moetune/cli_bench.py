"""``moetune bench``: the tuned op against the default config, a PyTorch loop and the floor.

Registered by :mod:`moetune.cli` (it imports this module at its end, after the shared options
this one imports from it), so import ``moetune.cli`` rather than this module first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table as RichTable

from moetune.cli_common import (
    TINY,
    TINY_BATCHES,
    ActOpt,
    BiasOpt,
    BlockOpt,
    DtypeOpt,
    EOpt,
    JsonOpt,
    KOpt,
    ModelOpt,
    NOpt,
    PerChanOpt,
    QuantOpt,
    TopkOpt,
    TpOpt,
    UsageError,
    check_folder,
    err,
    fail,
    guard,
    out,
    parse_ints,
    problem_from_options,
)
from moetune.keep import move_aside

DEFAULT_BENCH_DIR = Path("results/bench")


@guard
def bench(
    model: ModelOpt = None,
    tp: TpOpt = 1,
    E: EOpt = None,
    N: NOpt = None,
    K: KOpt = None,
    topk: TopkOpt = None,
    dtype: DtypeOpt = None,
    quant: QuantOpt = None,
    block_shape: BlockOpt = None,
    per_channel: PerChanOpt = False,
    bias: BiasOpt = False,
    activation: ActOpt = "silu",
    batch_sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated batch sizes (default: vLLM's 18; 1,4,16 on CPU)."),
    ] = None,
    skew: Annotated[
        str,
        typer.Option(
            help="Routing: uniform, zipf (a few hot experts, a long tail) or one-hot "
            "(every token to experts 0, 1)."
        ),
    ] = "uniform",
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for <name>.json and <name>.png.")
    ] = DEFAULT_BENCH_DIR,
    replays: Annotated[int, typer.Option(help="Timed replays per measurement.")] = 20,
    static_scales: Annotated[
        bool,
        typer.Option(
            "--static-scales",
            help="fp8/int8 w8a8: quantize activations with static per-tensor scales calibrated "
            "on the inputs (as checkpoints with static scales run), not dynamic ones.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Time the op with its tuned table against the default config, a plain PyTorch loop over
    experts and the roofline floor measured on this GPU; each output is checked first.

    With no problem given it benches a built-in default: on a CPU-only machine a tiny problem in
    Triton's interpreter (timings are then interpreter timings, and there is no floor).

    Example: moetune bench --model Mixtral-8x7B --tp 2 --batch-sizes 1,64,4096
    """
    from moetune.bench import bench_name, run_bench, save_json, save_plot
    from moetune.inputs import SKEWS
    from moetune.platform import detect_platform
    from moetune.presets import DEFAULT_BATCH_SIZES, preset_problem
    from moetune.problem import Problem

    plat = detect_platform()
    prob = problem_from_options(
        model, tp, E, N, K, topk, dtype, quant, block_shape, per_channel, bias, activation
    )
    batches = parse_ints(batch_sizes, "--batch-sizes")
    check_folder(out_dir, "--out")
    if skew not in SKEWS:
        raise UsageError(f"--skew must be one of {', '.join(SKEWS)}, got {skew!r}")
    if replays < 1:
        raise UsageError(f"--replays must be a positive integer, got {replays}")
    if prob is None:
        prob = Problem(**TINY) if plat.is_interpreter else preset_problem("Mixtral-8x7B", 2)
    if static_scales and not prob.takes_static_scales:
        raise UsageError("--static-scales needs --quant fp8_w8a8 or int8_w8a8 with per-tensor "
                         "scales (no --per-channel, no --block-shape)")  # fmt: skip
    if plat.is_interpreter:
        if prob.dtype == "bfloat16":
            raise UsageError("the interpreter cannot run bfloat16 dots: use --dtype float16 on CPU")
        batches = batches or TINY_BATCHES
    batches = batches or list(DEFAULT_BATCH_SIZES)
    scales = ", static activation scales" if static_scales else ""
    err.print(f"moetune bench: {prob.describe()} on {plat.device_name}, {skew} routing{scales}, "
              f"{len(batches)} batch sizes", highlight=False)  # fmt: skip
    with err.status("measuring ceilings, then benchmarking"):
        result = run_bench(prob, batches, device="cpu" if plat.is_interpreter else "cuda",
                           skew=skew, replays=replays, static_scales=static_scales,
                           progress=lambda m: err.print(m, highlight=False))  # fmt: skip
    name = bench_name(prob, plat.device_name, skew, static_scales)
    kept = _keep_earlier(out_dir / f"{name}.json", out_dir / f"{name}.png")
    if kept:
        err.print(f"Warning: kept the earlier {name}.json as {kept}", markup=False,
                  highlight=False)  # fmt: skip
    json_path = save_json(result, out_dir / f"{name}.json")
    png_path = out_dir / f"{name}.png"
    if not save_plot(result, png_path):
        err.print("matplotlib is not installed: no plot (pip install matplotlib)")
        png_path = None
    if json_out:
        payload = {**result.as_dict(), "json": str(json_path), "png": png_path and str(png_path)}
        out.print_json(json.dumps(payload))
    else:
        _render(result, json_path, png_path)
    bad = [f"M={r.M} {v.name}: {v.reason}" for r in result.rows
           for v in (r.default, r.tuned, r.naive) if not v.ok]  # fmt: skip
    if bad:
        fail(f"{len(bad)} failed check(s) or run(s), no timing reported for them: {bad[0]}", 1)


def _keep_earlier(json_path: Path, png_path: Path) -> str | None:
    """An earlier run's JSON (and plot) under the same name is a measurement: rename both to the
    first free ``.old``, ``.old1``, ... suffix instead of writing over them. The JSON's new name,
    or None when there was none."""
    if not json_path.exists():
        return None
    return move_aside([json_path, png_path])[0].name


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _render(result, json_path: Path, png_path: Path | None) -> None:
    c = result.ceilings
    ceil = "no floor (interpreter)"
    if c.available:
        ceil = (f"ceilings: {c.bandwidth_Bps / 1e9:,.0f} GB/s (best of read "
                f"{(c.read_Bps or 0) / 1e9:,.0f}, copy {(c.copy_Bps or 0) / 1e9:,.0f}), "
                f"{c.bf16_flops / 1e12:,.0f} TFLOP/s bf16"
                + (f", {c.fp8_flops / 1e12:,.0f} fp8" if c.fp8_flops else ""))  # fmt: skip
    source = {"table": f"tuned = table {Path(result.table_path or '').name}",
              "default": "no tuned table found: tuned = default config",
              "given": "tuned = given configs"}[result.tuned_source]  # fmt: skip
    scales = ", static activation scales" if result.static_scales else ""
    title = f"moetune bench: {result.problem.describe()}, {result.skew} routing{scales}"
    t = RichTable(title=title,
                  caption=f"{result.note}\n{source}; {ceil}")  # fmt: skip
    for col in ("M", "default µs", "tuned µs", "naive µs", "floor µs", "tuned/floor",
                "vs default", "vs naive"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in result.rows:
        cells = [_us(v.us) if v.ok else "[red]FAIL[/]" for v in (r.default, r.tuned, r.naive)]
        t.add_row(str(r.M), *cells, _us(r.floor.us if r.floor else None), _x(r.tuned_over_floor),
                  _x(r.speedup_vs_default), _x(r.speedup_vs_naive))  # fmt: skip
    out.print(t)
    methods = sorted({v.timing.method for r in result.rows for v in (r.default, r.tuned, r.naive)
                      if v.timing})  # fmt: skip
    out.print(f"timing methods: {', '.join(methods) or '-'}", highlight=False)
    out.print(f"json: {json_path}", highlight=False)
    if png_path is not None:
        out.print(f"plot: {png_path}", highlight=False)
