"""The ``moetune`` command line: thin wrappers that parse, call one library function, render.

Results go to stdout (a rich table, or JSON with ``--json``); progress and diagnostics go to
stderr. A user mistake prints one ``Error:`` line and exits 2; a failure of the work exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table as RichTable

from moetune.cli_bench import bench
from moetune.cli_common import (
    DEFAULT_JOURNAL_DIR,
    DEFAULT_TABLE_DIR,
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
    PlatformOpt,
    QuantOpt,
    TopkOpt,
    TpOpt,
    UsageError,
    check_file_target,
    check_folder,
    err,
    fail,
    guard,
    out,
    parse_ints,
    parse_restrict,
    platform_from_option,
    problem_from_options,
    run_with_progress,
)

app = typer.Typer(
    help="Tune, export and verify fused-MoE Triton kernel configs, every candidate checked "
    "against a float64 reference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Click's own one-line "Error:" for parse mistakes, plain --help
)


@app.command()
@guard
def sweep(
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
    platform: PlatformOpt = None,
    space: Annotated[
        str | None,
        typer.Option(
            help="Named space: full, fast or tiny (default: the --space-spec file's, "
            "full if it names none; else fast; in the interpreter every space is the "
            "tiny one)."
        ),
    ] = None,
    restrict: Annotated[
        list[str] | None, typer.Option(help="Narrow a knob: KNOB=V1,V2 (repeatable).")
    ] = None,
    space_spec: Annotated[
        Path | None, typer.Option(help="YAML: {space: fast, restrict: {KNOB: [..]}}.")
    ] = None,
    batch_sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated batch sizes (default: vLLM's 18; 1,4,16 on CPU)."),
    ] = None,
    journal: Annotated[Path | None, typer.Option(help="Journal file (JSON lines).")] = None,
    fresh: Annotated[
        bool, typer.Option(help="Start the journal over instead of resuming.")
    ] = False,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the exported table.")
    ] = DEFAULT_TABLE_DIR,
    compile_workers: Annotated[
        int | None,
        typer.Option(
            help="Processes compiling candidates ahead on GPUs (default: 16, and 4 more "
            "per extra GPU, at most one per usable CPU; 0 = none)."
        ),
    ] = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPUs to spread the work over: 'all' or '0,1,...'.")
    ] = None,
    isolate: Annotated[
        bool | None,
        typer.Option(help="Run candidates in worker processes (default: on GPUs, not on CPU)."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds one (candidate, batch size) may take before its "
            "worker is killed and the pair recorded as failed."
        ),
    ] = 600.0,
    backend: Annotated[str, typer.Option(help="local, or ray (needs moetune[ray]).")] = "local",
    skew: Annotated[
        str, typer.Option(help="Routing of the random inputs: uniform, zipf or one-hot.")
    ] = "uniform",
    act_scales: Annotated[
        str | None,
        typer.Option(
            help="w8a8 activation scales while tuning: static (calibrated per tensor, as "
            "vLLM's tuner and checkpoints with input scales run; the default for per-tensor "
            "fp8_w8a8/int8_w8a8) or dynamic (computed each call; the only choice otherwise)."
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="exhaustive (every candidate at every batch size) or halving (all at "
            "3 anchor batch sizes, the fastest --keep fraction at the rest). Default: "
            "exhaustive, halving with --budget."
        ),
    ] = None,
    keep: Annotated[
        float, typer.Option(help="Fraction kept by --strategy halving (not with --budget).")
    ] = 0.25,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Seconds the sweep should take (implies halving; replaces --keep: as many "
            "candidates go past the anchor batch sizes as fit, at least 4; the choice is "
            "journaled, so a resumed run keeps it)."
        ),
    ] = None,
    gemms: Annotated[
        str,
        typer.Option(
            help="joint (one config for both GEMMs, vLLM's table) or split (tune the up and "
            "down GEMMs apart: also writes a _down table)."
        ),
    ] = "joint",
    vllm_safe: Annotated[
        bool,
        typer.Option(
            help="With --gemms split: the main table (vLLM runs its entry on both GEMMs) holds "
            "the up winner only where that entry on both passed and is at most 1% slower than "
            "the incumbent's (no incumbent: only where it passed); elsewhere the fastest pair "
            "whose up entry is the incumbent's. --no-vllm-safe: the fastest pair for "
            "moetune's op."
        ),
    ] = True,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local one).")
    ] = None,
    incumbent: Annotated[
        str,
        typer.Option(
            help="The table a re-tune replaces: where its entry at a batch size is a candidate "
            "of the swept space (and the sweep is joint), it is re-timed among the finalists "
            "(with --strategy halving, even if it did not go past the anchors), so a new entry "
            "beat it in the same run. auto (the table the runtime finds for this problem and "
            "GPU), none, or a table file."
        ),
    ] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Sweep kernel configs for one MoE problem: check each against the reference, time it.

    With no problem given it sweeps a built-in default: on a CPU-only machine a tiny problem in
    Triton's interpreter (timings are then interpreter timings, not GPU timings).

    Example: moetune sweep --model Mixtral-8x7B --tp 2 --space fast
    """
    from moetune.procs import gpu_machine, prestart

    if platform is None and backend == "local" and isolate is not False and gpu_machine():
        prestart()  # workers and compile processes import torch once, while this one starts
    from moetune.export import export_configs
    from moetune.precompile import default_compile_workers
    from moetune.presets import DEFAULT_BATCH_SIZES, preset_problem
    from moetune.problem import Problem
    from moetune.space import load_space_spec, search_space
    from moetune.sweep import run_sweep, timings_note

    plat = platform_from_option(platform)
    prob = problem_from_options(
        model, tp, E, N, K, topk, dtype, quant, block_shape, per_channel, bias, activation
    )
    batches = parse_ints(batch_sizes, "--batch-sizes")
    check_folder(out_dir, "--out")
    if compile_workers is not None and compile_workers < 0:
        raise UsageError(f"--compile-workers must be 0 or more, got {compile_workers}")
    default_space = "fast"
    if prob is None:
        if plat.is_interpreter:
            prob = Problem(**TINY)
            default_space = "tiny"
        else:
            prob = preset_problem("Mixtral-8x7B", 2)
    if plat.is_interpreter:
        if prob.dtype == "bfloat16":
            raise UsageError("the interpreter cannot run bfloat16 dots: use --dtype float16 on CPU")
        batches = batches or TINY_BATCHES
    batches = batches or list(DEFAULT_BATCH_SIZES)
    try:
        restrict_map = parse_restrict(restrict)
        if space_spec is not None:
            spec = load_space_spec(space_spec)
            if space is not None and spec["space"] is not None and space != spec["space"]:
                raise UsageError(f"--space {space} and {space_spec}'s space {spec['space']} "
                                 "differ: give one")  # fmt: skip
            space = space or spec["space"] or "full"  # a spec that names no space: full
            restrict_map = {**(spec.get("restrict") or {}), **(restrict_map or {})}
        space = space or default_space
        candidates = search_space(plat, prob, space, restrict_map)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not candidates:
        raise UsageError("the search space is empty after pruning and restrictions")
    execution = _execution(plat, gpus, isolate, timeout, backend, ray_address, skew)
    strategy = strategy or ("halving" if budget is not None else "exhaustive")
    if strategy not in ("exhaustive", "halving"):
        raise UsageError(f"--strategy must be exhaustive or halving, got {strategy!r}")
    if budget is not None and (not math.isfinite(budget) or budget <= 0 or strategy != "halving"):
        raise UsageError(f"--budget must be > 0 seconds and goes with --strategy halving, "
                         f"got {budget} with {strategy}")  # fmt: skip
    if not 0 < keep <= 1:
        raise UsageError(f"--keep must be in (0, 1], got {keep}")
    from moetune.gemms import GEMM_MODES

    if gemms not in GEMM_MODES:
        raise UsageError(f"--gemms must be joint or split, got {gemms!r}")
    act_scales = _act_scales(prob, act_scales)
    execution = dataclasses.replace(execution, strategy=strategy, keep=keep, gemms=gemms,
                                    budget_s=budget, act_scales=act_scales,
                                    vllm_safe=vllm_safe)  # fmt: skip
    if compile_workers is None:
        compile_workers = default_compile_workers(len(execution.gpus or [0]))
    journal = journal or DEFAULT_JOURNAL_DIR / _journal_name(prob, plat, space, skew, gemms,
                                                             act_scales)  # fmt: skip
    check_file_target(journal, "--journal")
    old = _incumbent(incumbent, prob, plat)
    note = timings_note(plat.is_interpreter)
    err.print(f"moetune sweep: {prob.describe()} on {plat.device_name}; {len(candidates)} "
              f"candidates × {len(batches)} batch sizes; journal {journal}",
              markup=False, highlight=False)  # fmt: skip
    if old is not None:  # a finalist at every batch size where it passes (sweep.finalists)
        err.print(f"incumbent table: {old.path}", markup=False, highlight=False)
    err.print(note)
    result = run_with_progress(
        lambda progress: run_sweep(
            prob,
            plat,
            candidates,
            batch_sizes=batches,
            journal_path=journal,
            space_name=space,
            fresh=fresh,
            progress=progress,
            compile_workers=compile_workers,
            execution=execution,
            incumbent={M: old.lookup(M) for M in batches} if old is not None else None,
        )
    )
    exported = None
    if any(b.best for b in result.batches):
        exported = export_configs([result.journal], out_dir)
        for w in exported.warnings:
            err.print(f"Warning: {w}", markup=False, highlight=False)
    _render_sweep(result, exported, note, json_out)
    if not any(b.best for b in result.batches):
        fail("no candidate passed its check at any batch size", 1)


def _execution(plat, gpus: str | None, isolate: bool | None, timeout: float, backend: str,
               ray_address: str | None, skew: str = "uniform"):  # fmt: skip
    from moetune.inputs import SKEWS
    from moetune.sweep import Execution

    if skew not in SKEWS:
        raise UsageError(f"--skew must be one of {', '.join(SKEWS)}, got {skew!r}")
    if backend not in ("local", "ray"):
        raise UsageError(f"--backend must be local or ray, got {backend!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    gpu_list: list[int] | None = None
    if gpus is not None:
        if plat.is_interpreter:
            raise UsageError("--gpus needs GPUs; this run uses Triton's interpreter on the CPU")
        import torch

        count = torch.cuda.device_count()
        try:
            gpu_list = list(range(count)) if gpus == "all" else [int(g) for g in gpus.split(",")]
        except ValueError:
            raise UsageError(f"--gpus takes 'all' or GPU indices like 0,1; got {gpus!r}") from None
        if any(g < 0 for g in gpu_list):
            raise UsageError(f"--gpus takes 'all' or GPU indices like 0,1; got {gpus!r}")
        bad = [g for g in gpu_list or [] if g >= count]
        if bad or not gpu_list:
            raise UsageError(f"--gpus {gpus!r}: this machine has {count} GPU(s)")
        if len(set(gpu_list)) != len(gpu_list):
            raise UsageError(f"--gpus {gpus!r} names a GPU twice")
    elif not plat.is_interpreter:
        gpu_list = [0]
    if isolate is None:
        isolate = not plat.is_interpreter
    return Execution(isolate=isolate or backend == "ray" or len(gpu_list or []) > 1,
                     gpus=gpu_list, timeout_s=timeout, backend=backend,
                     ray_address=ray_address, skew=skew)  # fmt: skip


def _incumbent(choice: str, prob, plat):
    """--incumbent resolved to a loaded table, or None: ``auto`` is the table the runtime would
    find for this problem under this platform's device name (none is fine), ``none`` is none, and
    anything else must be a readable table file."""
    from moetune import lookup
    from moetune.tables import TableError, load_table

    if choice == "none":
        return None
    if choice == "auto":
        if plat.is_interpreter:
            return None
        return lookup.find_table(prob.E, prob.N, dtype=prob.table_dtype,
                                 block_shape=prob.block_shape,
                                 device_name=plat.device_name)  # fmt: skip
    try:
        table = load_table(choice)
    except TableError as e:
        raise UsageError(f"--incumbent: {e}") from None
    name = table.name
    if name is None:  # a file under another name: taken at its word
        return table
    if name.gemm != "up":
        raise UsageError(f"--incumbent {choice} is a {name.suffix} table; give the main table")
    dtype = None if name.dtype == "bf16" else name.dtype  # vLLM's older spelling of bfloat16
    theirs = (name.E, name.N, dtype, name.block_shape)
    ours = (prob.E, prob.N, prob.table_dtype, prob.block_shape)
    if theirs != ours:
        raise UsageError(f"--incumbent {choice} is a table for another problem (E, N, dtype, "
                         f"block shape {theirs}; this one {ours})")  # fmt: skip
    return table


def _act_scales(prob, choice: str | None) -> str:
    """--act-scales resolved: static by default where a problem can take static scales (w8a8 per
    tensor), dynamic elsewhere; static where it cannot is a usage error."""
    from moetune.sweep import ACT_SCALES

    if choice is None:
        return "static" if prob.takes_static_scales else "dynamic"
    if choice not in ACT_SCALES:
        raise UsageError(f"--act-scales must be static or dynamic, got {choice!r}")
    if choice == "static" and not prob.takes_static_scales:
        raise UsageError("--act-scales static is for per-tensor fp8_w8a8 and int8_w8a8 problems "
                         f"(this one: {prob.describe()})")  # fmt: skip
    return choice


def _journal_name(prob, plat, space: str, skew: str, gemms: str = "joint",
                  act_scales: str = "dynamic") -> str:  # fmt: skip
    routing = "" if skew == "uniform" else f"-{skew}"
    split = "" if gemms == "joint" else f"-{gemms}"
    scales = "-static" if act_scales == "static" else ""
    return f"{plat.device_name}-{prob.slug()}-{space}{routing}{split}{scales}.jsonl"


def _render_sweep(result, exported, note: str, json_out: bool) -> None:
    from moetune.sweep import fmt_us

    rows = []
    split = any(b.best_down for b in result.batches)
    for b in result.batches:
        rows.append({
            "M": b.M,
            "best": b.best["winner"] if b.best else None,
            "config": b.best["config"] if b.best else None,
            "time_us": b.time_us,
            "default_us": b.default_us,
            "speedup_vs_default": round(b.speedup, 3) if b.speedup else None,
            "counts": b.counts,
            "rejected_or_failed": b.reasons,
            # A split sweep's time_us is the two winners timed together (pair_us) where they
            # were; time_up_us and time_down_us are each winner's own record's time: the other
            # GEMM at the heuristic default, or the pair's for winners a pair settled.
            **({"best_down": b.best_down["winner"] if b.best_down else None,
                "config_down": b.best_down["config"] if b.best_down else None,
                "pair_us": b.pair_us,
                "time_up_us": b.best["timing"]["median_us"] if b.best else None,
                "time_down_us": b.best_down["timing"]["median_us"] if b.best_down else None}
               if split else {}),
        })  # fmt: skip
    tables = [str(p) for p in exported.paths] if exported else []
    if json_out:
        payload = {"journal": str(result.journal), "tables": tables, "note": note,
                   "interpreter": result.interpreter, "wall_s": round(result.wall_s, 1),
                   "batches": rows}  # fmt: skip
        out.print_json(json.dumps(payload))
        return
    t = RichTable(title="moetune sweep", caption=note)
    for col in ("M", "best config", "time µs", "default µs", "speedup", "ok/rej/fail/pruned",
                "why rejected/failed"):  # fmt: skip
        t.add_column(
            col, justify="right" if col not in ("best config", "why rejected/failed") else "left"
        )
    for r in rows:
        c = r["counts"]
        t.add_row(
            str(r["M"]),
            f"{r['best'] or '-'} + {r['best_down'] or '-'}" if split else r["best"] or "-",
            fmt_us(r["time_us"]), fmt_us(r["default_us"]),
            f"{r['speedup_vs_default']:.2f}×" if r["speedup_vs_default"] else "-",
            f"{c.get('ok', 0)}/{c.get('rejected', 0)}/{c.get('failed', 0)}/{c.get('pruned', 0)}",
            ", ".join(f"{k} ×{v}" for k, v in sorted(r["rejected_or_failed"].items())) or "-",
        )  # fmt: skip
    out.print(t)
    out.print(f"journal: {result.journal}", highlight=False)
    for p in tables:
        out.print(f"table:   {p}", highlight=False)


@app.command("export-configs")
@guard
def export_configs_cmd(
    journals: Annotated[
        list[Path], typer.Argument(help="Sweep journals (JSON lines; .jsonl.gz read as well).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Destination folder.")] = Path("configs"),
    device_name: Annotated[
        str | None, typer.Option(help="Override the device part of the file name.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="vllm, or sglang (both names).")] = "vllm",
    merge: Annotated[
        bool,
        typer.Option(
            help="Into the table already in --out: replace its entries at the journals' "
            "batch sizes only, keep the rest (a re-tune of some batch sizes)."
        ),
    ] = False,
    batch_sizes: Annotated[
        str | None,
        typer.Option(help="Only these of the journals' batch sizes (comma-separated)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the fastest passing config per batch size as a vLLM-named table (+ sidecar).

    Example: moetune export-configs results/sweeps/*.jsonl --out configs
    """
    from moetune.export import ExportError, check_options, export_configs

    if fmt not in ("vllm", "sglang"):
        raise UsageError(f"--format must be vllm or sglang, got {fmt!r}")
    only = parse_ints(batch_sizes, "--batch-sizes")
    try:
        check_options(sglang=fmt == "sglang", merge=merge, batch_sizes=only)
    except ExportError as e:  # options that cannot go together: a usage mistake
        raise UsageError(str(e)) from None
    check_folder(out_dir, "--out")
    if device_name is not None and (not device_name or set(device_name) & set(" \t\n,/=")):
        raise UsageError(f"--device-name {device_name!r} must be vLLM's spelling: no spaces, "
                         "',', '/' or '=' (e.g. NVIDIA_H100_80GB_HBM3)")  # fmt: skip
    for j in journals:
        if not j.is_file():
            what = "is a folder" if j.is_dir() else "not found"
            raise UsageError(f"journal {what}: {j}")
    res = export_configs(journals, out_dir, device_name=device_name, sglang=fmt == "sglang",
                         merge=merge, batch_sizes=only)  # fmt: skip
    for w in res.warnings:
        err.print(f"Warning: {w}", markup=False, highlight=False)
    if json_out:
        entries = {str(k): v for k, v in res.entries.items()}
        payload = {"tables": [str(p) for p in res.paths], "entries": entries}
        if res.changed is not None:
            payload["changed"] = res.changed
        if res.down_entries is not None:
            payload["entries_down"] = {str(k): v for k, v in res.down_entries.items()}
        out.print_json(json.dumps(payload))
        return
    for p in res.paths:
        if res.changed == []:
            line = f"left {p} as it was (the journals' entries are its own)"
        else:
            line = f"wrote {p} ({len(res.entries)} batch sizes"
            line += f"; changed M={','.join(map(str, res.changed))})" if res.changed else ")"
        out.print(line, markup=False, highlight=False)


@app.command()
@guard
def verify(
    paths: Annotated[list[Path], typer.Argument(help="Table files or folders of tables.")],
    K: KOpt = None,
    topk: TopkOpt = None,
    batch_sizes: Annotated[str | None, typer.Option(help="Only these batch sizes.")] = None,
    schema_only: Annotated[bool, typer.Option(help="Validate files only; run nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-check config tables (moetune's or vLLM's) on the GPU at hand (interpreter on CPU).

    Example: moetune verify configs/ ../shared/data/vllm-tables --batch-sizes 1,64
    """
    from rich.markup import escape

    from moetune.verify import collect_table_paths, verify_tables

    for label, v in (("--K", K), ("--topk", topk)):
        if v is not None and v < 1:
            raise UsageError(f"{label} must be a positive integer, got {v}")
    batches = parse_ints(batch_sizes, "--batch-sizes")
    try:
        files = collect_table_paths(paths)
    except ValueError as e:
        raise UsageError(str(e)) from None
    title = f"verifying {len(files)} table(s)"
    try:
        with err.status(title) as status:

            def progress(line: str) -> None:  # the spinner's text, or a line a result off a tty
                if err.is_terminal:
                    status.update(f"{title}: {line[:70]}")
                else:
                    err.print(line, markup=False, highlight=False, soft_wrap=True)

            report = verify_tables(files, K=K, topk=topk, schema_only=schema_only,
                                   batch_sizes=batches, progress=progress)  # fmt: skip
    except ValueError as e:  # the kernel cannot run on this machine
        fail(str(e), 1)
    if json_out:
        out.print_json(json.dumps({
            "ok": report.ok, "device": report.device, "interpreter": report.interpreter,
            "note": report.note, "results": [r.as_dict() for r in report.results],
        }, default=str))  # fmt: skip
    else:
        t = RichTable(title="moetune verify", caption=report.note)
        for col in ("file", "M", "status", "worst row err", "reason"):
            t.add_column(col)
        for r in report.results:
            style = {"ok": "green", "skipped": "yellow"}.get(r.status, "red")
            err_txt = f"{r.worst_row_err:.2e}" if r.worst_row_err is not None else "-"
            # File names and reasons quote the table's own keys: text, never rich markup.
            t.add_row(escape(Path(r.file).name), str(r.batch_size or "-"),
                      f"[{style}]{r.status}[/]", err_txt, escape(r.reason or ""))  # fmt: skip
        out.print(t)
    if not report.ok:
        bad = [r for r in report.results if r.status in ("failed", "invalid")]
        first = f"{Path(bad[0].file).name}: {bad[0].status}, {bad[0].reason}"
        fail(f"{len(bad)} of {len(report.results)} results failed or invalid; first {first}", 1)
    for p in (p for p in paths if p.is_file()):  # a table named must be checked, not skipped
        target = p.resolve()
        mine = [r for r in report.results if Path(r.file).resolve() == target]
        if mine and all(r.status == "skipped" for r in mine):
            fail(f"{p.name}: skipped, {mine[0].reason}", 1)
    if not any(r.status == "ok" for r in report.results):
        wanted = f" at --batch-sizes {batch_sizes}" if batches else ""
        fail(f"nothing was checked{wanted}: no entry of {len(files)} table(s) ran", 1)


@app.command()
@guard
def space(
    model: ModelOpt = None,
    tp: TpOpt = 1,
    E: EOpt = None,
    N: NOpt = None,
    K: KOpt = None,
    topk: TopkOpt = None,
    dtype: DtypeOpt = None,
    quant: QuantOpt = None,
    block_shape: BlockOpt = None,
    platform: PlatformOpt = None,
    name: Annotated[str, typer.Option("--space", help="full, fast or tiny.")] = "fast",
    json_out: JsonOpt = False,
) -> None:
    """Show the search space a sweep would use (no GPU needed: name the platform).

    Example: moetune space --platform mi325x --model Qwen3-30B-A3B --tp 2 --space fast
    """
    from moetune.space import search_space, space_id

    plat = platform_from_option(platform, runs_here=False)
    prob = problem_from_options(
        model, tp, E, N, K, topk, dtype, quant, block_shape, False, False, "silu"
    )
    if prob is None:
        raise UsageError("give --model or --E/--N/--K/--topk")
    try:
        cands = search_space(plat, prob, name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if json_out:
        out.print_json(json.dumps({"platform": plat.key, "space": name, "space_id": space_id(cands),
                                   "candidates": [c.as_config() for c in cands]}))  # fmt: skip
        return
    tiny = " (the interpreter's spaces are all the tiny one)" if plat.is_interpreter else ""
    out.print(f"{plat.device_name} ({plat.arch}), {prob.describe()}: space {name!r} has "
              f"{len(cands)} candidates (id {space_id(cands)}){tiny}", highlight=False)  # fmt: skip
    for c in cands[:20]:
        out.print("  " + c.key(), highlight=False)
    if len(cands) > 20:
        out.print(f"  … {len(cands) - 20} more (--json lists all)", highlight=False)


app.command()(bench)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
