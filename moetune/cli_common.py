"""What the ``moetune`` commands share: consoles, option types, parsing helpers, error handling.

Kept apart from the commands so every command module (cli.py, cli_bench.py) imports it and none
imports another.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

DEFAULT_JOURNAL_DIR = Path("results/sweeps")
DEFAULT_TABLE_DIR = Path("results/tables")
# The built-in problem of a CPU-only machine: small enough for Triton's interpreter.
TINY = {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16"}
TINY_BATCHES = [1, 4, 16]


class UsageError(Exception):
    """A mistake in the command line or its files: exit 2."""


def fail(message: str, code: int = 1) -> None:
    """One ``Error:`` line: the message is folded onto one line and printed verbatim (a path or
    a key such as ``[/x]`` must not be read as rich markup)."""
    from rich.markup import escape

    text = escape(" ".join(str(message).split()))
    err.print(f"[bold red]Error:[/] {text}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_ints(text: str | None, what: str, *, unique: bool = True) -> list[int] | None:
    """Comma-separated positive integers (None for None); ``unique``: none named twice."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if unique and twice:
        raise UsageError(f"{what} names {', '.join(map(str, twice))} more than once: {text!r}")
    return values


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists, when that is not a folder."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_folder(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder option that names a file (or lies under one): the
    work's results would otherwise be lost at the end, when they cannot be written."""
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "" if blocker == path else f" ({blocker} is a file)"
        raise UsageError(f"{flag} {path} is not a folder{where}")


def check_file_target(path: Path, flag: str) -> None:
    """Refuse, before any work, a file option that names a folder or lies under a file."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise UsageError(f"{flag} {path}: {blocker} is a file, not a folder")


def parse_restrict(items: list[str] | None) -> dict[str, list[int]] | None:
    if not items:
        return None
    restrict: dict[str, list[int]] = {}
    for item in items:
        knob, sep, values = item.partition("=")
        if not sep:
            raise UsageError(f"--restrict takes KNOB=V1,V2 (e.g. BLOCK_SIZE_M=16,32), got {item!r}")
        if knob.strip() in restrict:
            raise UsageError(f"--restrict names {knob.strip()} twice: give its values once, "
                             f"as {knob.strip()}=V1,V2")  # fmt: skip
        restrict[knob.strip()] = parse_ints(values, f"--restrict {knob}") or []
    return restrict


# Options shared by the commands that take a problem.
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Built-in preset, e.g. Mixtral-8x7B.")
]
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel size for --model.")]
EOpt = Annotated[int | None, typer.Option("--E", help="Number of experts.")]
NOpt = Annotated[int | None, typer.Option("--N", help="Intermediate size per shard.")]
KOpt = Annotated[int | None, typer.Option("--K", help="Hidden size.")]
TopkOpt = Annotated[int | None, typer.Option("--topk", help="Experts per token.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="bfloat16, float16 or float32.")]
QuantOpt = Annotated[str | None, typer.Option("--quant", help="fp8_w8a8, int8_w8a8, int8_w8a16.")]
BlockOpt = Annotated[str | None, typer.Option("--block-shape", help="Block quantization 'bn,bk'.")]
PerChanOpt = Annotated[bool, typer.Option("--per-channel", help="Per-token × per-channel scales.")]
BiasOpt = Annotated[bool, typer.Option("--bias", help="The layer has biases.")]
ActOpt = Annotated[str, typer.Option("--activation", help="silu or swigluoai.")]
PlatformOpt = Annotated[
    str | None,
    typer.Option("--platform", help="h100, h200, mi325x, mi355x, ... (default: the GPU at hand)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def problem_from_options(
    model, tp, E, N, K, topk, dtype, quant, block_shape, per_channel, bias, activation
):
    from moetune.presets import preset_problem
    from moetune.problem import Problem

    block = parse_ints(block_shape, "--block-shape", unique=False)
    if block is not None and len(block) != 2:
        raise UsageError(f"--block-shape takes two integers 'bn,bk', got {block_shape!r}")
    # Options that shape an explicit problem only: a preset (or the default problem) fixes them.
    flags = {"--block-shape": block is not None, "--per-channel": per_channel, "--bias": bias,
             "--activation": activation != "silu"}  # fmt: skip
    shaping = [opt for opt, given in flags.items() if given]
    try:
        if model is not None:
            if any(v is not None for v in (E, N, K, topk)):
                raise UsageError("give either --model or --E/--N/--K/--topk, not both")
            if shaping:
                raise UsageError(f"{', '.join(shaping)}: --model takes them from its preset")
            return preset_problem(model, tp, dtype=dtype, quant=quant or "default")
        if tp != 1:
            raise UsageError("--tp splits a --model; with --E/--N/--K/--topk give N per shard")
        missing = [f"--{n}" for n, v in (("E", E), ("N", N), ("K", K), ("topk", topk)) if v is None]
        if missing and len(missing) < 4:
            raise UsageError(f"missing {', '.join(missing)} (or use --model)")
        if missing:
            given = shaping + [o for o, v in (("--dtype", dtype), ("--quant", quant)) if v]
            if given:
                raise UsageError(f"{', '.join(given)} needs --model or --E/--N/--K/--topk")
            return None
        return Problem(E, N, K, topk, dtype or "bfloat16", quant,
                       tuple(block) if block else None, per_channel, bias, activation)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None


def platform_from_option(name: str | None, *, runs_here: bool = True):
    """The named platform, or the one at hand. With ``runs_here`` the work runs on this machine,
    so a named GPU must be the one present (timings of another chip would be filed under its
    name), and the interpreter needs Triton's interpreter switched on."""
    from moetune.platform import detect_platform, get_platform

    try:
        plat = get_platform(name) if name else detect_platform()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name and runs_here:
        here = detect_platform()
        if plat.is_interpreter and not here.is_interpreter:
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise UsageError("--platform interpreter needs TRITON_INTERPRET=1 on a GPU machine")
        elif plat.key != here.key:
            has = "no GPU" if here.is_interpreter else f"a {here.device_name}"
            raise UsageError(
                f"--platform {name} needs that GPU and this machine has {has} "
                f"(`moetune space --platform {name}` shows its space without one)"
            )
    return plat


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is (a BaseException: no ``except Exception`` that
    records a bad candidate takes it for one), so that worker and compile processes are stopped
    and the journal closed on the way out, as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    # Once: `timeout` signals the process group too, and a second SIGTERM must not cut short
    # the stopping of workers and the closing of the journal this one starts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from moetune import procs  # stdlib only

    if not procs.defer_while_starting(Terminated()):  # raised once the helper has started
        raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _check_environment() -> None:
    """A misspelt MOETUNE_FP8_ACCUM would fail every fp8 launch one by one: refuse it up front."""
    from moetune.accum import fp8_accum_mode

    try:
        fp8_accum_mode()
    except ValueError as e:
        raise UsageError(str(e)) from None


def guard(fn):
    """Turn library errors into one ``Error:`` line: usage mistakes exit 2, failures exit 1,
    Ctrl-C 130 and SIGTERM 143 (both after stopping the sweep's processes)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moetune.export import ExportError
        from moetune.journal import JournalError
        from moetune.tables import TableError

        try:
            _check_environment()
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except UsageError as e:
            fail(str(e), 2)
        except (JournalError, ExportError, TableError, OSError) as e:
            fail(str(e), 1)
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            fail(
                f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                "(a smaller problem, fewer batch sizes, or a GPU with more memory)",
                1,
            )
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            code = 143 if isinstance(e, Terminated) else 130
            fail(f"{what}; the journal keeps every finished record, re-run to resume", code)

    return wrapper


def _out_of_memory(e: BaseException) -> bool:
    """Host or GPU memory ran out (torch raises RuntimeError subclasses for both)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


# Off a terminal (a log file, CI, nohup) the bar is not drawn: a line at most this often instead.
PLAIN_PROGRESS_S = 30.0


def run_with_progress(work):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
        transient=not err.is_terminal,
    ) as progress:  # fmt: skip
        task = progress.add_task("sweep", total=None)

        last = [time.monotonic()]

        def update(done: int, total: int, message: str) -> None:
            if total:
                progress.update(task, completed=done, total=total, description=message[:60])
                now = time.monotonic()
                if not err.is_terminal and (done >= total or now - last[0] >= PLAIN_PROGRESS_S):
                    last[0] = now
                    progress.console.print(f"{done}/{total} {message}", markup=False,
                                           highlight=False, soft_wrap=True)  # fmt: skip
            else:
                progress.console.print(message, highlight=False)

        return work(update)
