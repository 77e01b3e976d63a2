"""Re-verifying config tables: is every entry a config the kernel runs, and runs correctly?

``verify_tables`` reads each table and reports one :class:`EntryResult` per entry (or one per file
when the whole file is invalid or skipped). It never raises for a table's content; only for a
missing path or a machine that cannot run the kernel at all.

Rules, in the order they are applied:

- **Schema.** :func:`moetune.tables.load_table`; a :class:`TableError` (unreadable, malformed
  JSON, bad entry) becomes one ``invalid`` result naming the file and key.
- **The problem.** E and N come from the file name; so do the quantization and the block shape:
  no dtype part -> bfloat16 (float16 in the interpreter, which cannot ``tl.dot`` bf16),
  ``float32``, ``bf16`` -> bfloat16, ``fp8_w8a8`` (per tensor, or per block with the name's
  block shape), ``int8_w8a8``, ``int8_w8a16``; SGLang's ``,per_channel_quant=True`` -> per
  channel. Quantized problems compute in bfloat16 (float16 in the interpreter), as vLLM does.
  Anything else is ``skipped`` with the reason: other dtypes (``int4_w4a16``, ``float8``...),
  other backends (``,backend=flydsl``), a block shape without a quantization, a name that
  does not parse.
- **``_down`` tables** (the down GEMM's, SGLang's naming) run together with the main table
  beside them: each entry on w2, the main table's entry for the nearest batch size on w1, so
  the pair the runtime would launch is what is checked. Without a main table beside it (or
  with one that does not load) the ``_down`` table is ``skipped``, saying so.
- **K and topk** are not in vLLM's file names. Options win; else the first model preset (in
  ``MODEL_PRESETS`` order, tp = 1, 2, 4, 8) whose E and ``intermediate == N * tp`` match the file
  supplies them, together with its activation and bias (gpt-oss: swigluoai with biases), so the
  entry runs the layer vLLM would run it on; else K = 4096 and topk = min(2, E). topk is capped at
  E. ``problem`` says which values were used and where they came from.
- **Entry keys.** Keys the kernel does not take (``SPLIT_K``, ``num_ctas``, ``grf_mode``,
  FlyDSL's ``tile_*``) -> ``skipped`` naming the key. ROCm keys (``waves_per_eu``,
  ``matrix_instr_nonkdim``, ``kpack``) off ROCm are dropped, as the launcher passes them only on
  ROCm; ``note`` says so. An entry that passes the schema but that moetune's kernel cannot run
  (``BLOCK_SIZE_M`` 8: ``tl.dot`` needs tiles of at least 16) -> ``skipped`` with the launcher's
  reason: it is a limit of this kernel, not a fault of the table.
- **Block-quant clamp.** vLLM's launch (``invoke_fused_moe_kernel``) runs the kernel with
  ``BLOCK_SIZE_K = min(BLOCK_SIZE_K, block_n, block_k)``, so a table entry with BLOCK_SIZE_K 256
  for block_shape [128, 128] runs at 128. We apply the same clamp, say so in ``reason``, and the
  status stays ``ok`` when the numerics pass.
- **GPU run.** Every entry at its own batch size M on the table's real shape, fresh random inputs
  per entry (:func:`moetune.inputs.random_moe_inputs`, seeded from the file name and M so a rerun
  reproduces), a NaN-poisoned workspace, and :func:`moetune.check.check_op` against the
  float64 reference (following the op's re-quantization where it was a valid rounding). Tables
  for another device run here too: numerics only, and ``note`` says so.
- **Interpreter run (no GPU).** A tiny stand-in: E' = min(E, 4), N' = 32, K' = 64,
  topk' = min(topk, E'), M' = min(M, 8), block shape [32, 32] when the table has one (BLOCK_SIZE_K
  clamped to it as above). The entry's BLOCK sizes are what is being verified and are kept, but
  each is capped at 64 to keep the interpreter fast; ``reason`` says when that happened.
- **Faults never stop the run.** A compile or runtime error is a ``failed`` result carrying the
  exception's first line.

``batch_sizes`` restricts the run to the entries whose key is listed (other entries are left out
of the report; ``note`` says so). ``schema_only`` reads and classifies every entry as above
(clamps, skips, the problem it would run) without running anything: runnable entries are ``ok``
with "not run" in their reason.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moetune.accum import FP8_ACCUM_ENV, fp8_accum_mode
from moetune.check import check_op
from moetune.platform import device_name_aliases
from moetune.tables import Table, TableError, load_table, parse_table_filename
from moetune.verify_plan import (
    INTERPRETER_BLOCK_CAP,
    FilePlan,
    Notes,
    Target,
    entry_config,
    plan_file,
    plan_target,
)

STATUSES = ("ok", "failed", "invalid", "skipped")
INTERPRETER_NOTE = (
    "Interpreter run on CPU: entries checked on a tiny stand-in problem, not the table's shape; "
    "timings and GPU-specific failures are not covered."
)
# The interpreter's stand-in batch size cap (the rest of the stand-in: moetune.verify_plan).
STAND_IN_M = 8


@dataclass(frozen=True)
class EntryResult:
    """One table entry's verdict (``batch_size`` None: the verdict covers the whole file).

    ``config`` is what ran (after the adjustments ``reason`` lists), the file's entry when nothing
    ran, None when the file could not be read. ``problem`` describes the problem actually run.
    """

    file: str
    batch_size: int | None
    status: str  # "ok" | "failed" | "invalid" | "skipped"
    reason: str
    config: dict | None
    problem: str
    rel_err: float | None = None
    worst_row_err: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("rel_err", "worst_row_err"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = str(d[k])  # JSON has no NaN/inf
        return d


@dataclass(frozen=True)
class VerifyReport:
    results: list[EntryResult]
    device: str
    interpreter: bool
    note: str
    schema_only: bool = False

    @property
    def ok(self) -> bool:
        """No entry failed and no table was invalid (skipped entries do not count against it)."""
        return not any(r.status in ("failed", "invalid") for r in self.results)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.results)
        return {s: c.get(s, 0) for s in STATUSES}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "device": self.device,
            "interpreter": self.interpreter,
            "schema_only": self.schema_only,
            "note": self.note,
            "counts": self.counts,
            "results": [r.as_dict() for r in self.results],
        }


def collect_table_paths(paths: list[Path]) -> list[Path]:
    """Files as given, folders as their ``*.json`` tables (not recursive, sidecars left out).

    A missing path, or a folder with no table in it, is a ValueError naming it. Duplicates are
    dropped, first occurrence kept.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.glob("*.json")
                if f.is_file() and not f.name.endswith(".provenance.json")
            )
            if not found:
                raise ValueError(f"{p}: folder holds no *.json table")
        elif p.exists():
            found = [p]
        else:
            raise ValueError(f"{p}: no such file or folder")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[0]
    # Triton's CompilationError opens with "at L:C:" and the source; the message comes last.
    if re.fullmatch(r"at \d+:\d+:?", line):
        line = lines[-1]
    return f"{type(e).__name__}: {line}"


def _run_entry(
    plan: FilePlan, M: int, cfg: dict[str, Any], target: Target, seed: int,
    cfg_up: dict[str, Any] | None = None,
):  # fmt: skip
    """``(ok, reason, rel_err, worst_row_err)`` of one entry (a ``_down`` entry runs on w2 with
    ``cfg_up`` on w1); exceptions propagate."""
    from moetune.inputs import random_moe_inputs
    from moetune.ops import fused_experts
    from moetune.reference import Reference

    p = plan.problem
    args, kwargs = random_moe_inputs(p, M, target.device, seed=seed, fp8_dtype=target.fp8_dtype)
    up, down = (cfg, None) if cfg_up is None else (cfg_up, cfg)
    res = check_op(
        lambda: fused_experts(*args, **kwargs, config=up, config_down=down),
        Reference(*args, **kwargs), dtype=p.torch_dtype, quant=p.quant,
    )  # fmt: skip
    if target.device.startswith("cuda"):
        torch.cuda.synchronize(target.device)
    return res.ok, res.reason, res.rel_err, res.worst_row_err


def _verify_file(
    path: Path,
    target: Target,
    *,
    K: int | None,
    topk: int | None,
    batch_sizes: set[int] | None,
    seed: int,
    notes: Notes,
    emit: Callable[[EntryResult], None],
) -> None:
    fname = str(path)
    try:
        table = load_table(path)
    except TableError as e:
        # ASCII digits only: str.isdigit() also takes "²", and int() refuses 4300+ digits.
        bs = int(e.key) if e.key is not None and re.fullmatch(r"[0-9]{1,18}", e.key) else None
        where = f'key "{e.key}": ' if e.key is not None else ""
        emit(EntryResult(fname, bs, "invalid", where + e.reason, None, ""))
        return
    try:
        # A name load_table could not parse raises here, with the grammar in its message.
        name = table.name or parse_table_filename(path.name)
        plan = plan_file(name, target, K, topk)
    except ValueError as e:
        emit(EntryResult(fname, None, "skipped", str(e), None, ""))
        return
    main = _main_table(path, name) if name.gemm == "down" else None
    if isinstance(main, str):
        emit(EntryResult(fname, None, "skipped", main, None, ""))
        return
    foreign = (
        target.run
        and not target.interpreter
        and target.device_name not in device_name_aliases(name.device_name)
    )
    if foreign:
        notes.foreign.add(name.device_name)
    for bs, entry in table.entries.items():
        if batch_sizes is not None and bs not in batch_sizes:
            continue
        M = min(bs, STAND_IN_M) if target.interpreter else bs
        problem = f"{plan.describe} M={M}"
        try:
            cfg, changes = entry_config(entry, plan, target, notes)
            cfg_up = None
            if main is not None:
                cfg_up, up_changes = entry_config(main.lookup(bs), plan, target, notes)
                changes += [f"up GEMM ({main.path.name}): {c}" for c in up_changes]
        except ValueError as e:
            emit(EntryResult(fname, bs, "skipped", str(e), dict(entry), problem))
            continue
        if not target.run:
            emit(EntryResult(fname, bs, "ok", "; ".join(["not run", *changes]), cfg, problem))
            continue
        entry_seed = (zlib.crc32(f"{path.name}:{bs}".encode()) + seed) % 2**63
        if not target.interpreter and name.dtype == "fp8_w8a8":
            notes.fp8_ran = True  # this entry runs on the GPU: its accumulation mode matters
        try:
            ok, why, rel, worst = _run_entry(plan, M, cfg, target, entry_seed, cfg_up)
        except Exception as e:  # a fault in one entry never stops the run
            ok, why, rel, worst = False, _first_line(e), None, None
            if target.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if not ok and foreign:
            why += f" (table is for {name.device_name}, ran on {target.device_name})"
        status = "ok" if ok else "failed"
        reason = "; ".join(([] if ok else [why]) + changes)
        emit(EntryResult(fname, bs, status, reason, cfg, problem, rel, worst))


def _main_table(path: Path, name) -> Table | str:
    """The main table a ``_down`` table pairs with (same folder, same name without ``_down``),
    or the reason to skip the ``_down`` table."""
    main = path.with_name(path.name.removesuffix(name.suffix + ".json") + ".json")
    if not main.is_file():
        return f"_down table without its main table {main.name} beside it: nothing to pair with"
    try:
        return load_table(main)
    except TableError as e:
        return f"_down table whose main table does not load: {e}"


def _note(target: Target, notes: Notes, batch_sizes: set[int] | None) -> str:
    parts = []
    if not target.run:
        parts.append("Schema only: tables read and classified; no entry was run.")
    elif target.interpreter:
        parts.append(INTERPRETER_NOTE)
        if notes.capped:
            parts.append(
                f"BLOCK sizes above {INTERPRETER_BLOCK_CAP} were capped at "
                f"{INTERPRETER_BLOCK_CAP} to keep the interpreter fast."
            )
    if notes.rocm_dropped:
        parts.append(
            f"ROCm-only keys ({', '.join(sorted(notes.rocm_dropped))}) were dropped: "
            "the launcher passes them only on ROCm."
        )
    if notes.foreign:
        parts.append(
            f"Tables for other devices ({', '.join(sorted(notes.foreign))}) ran on "
            f"{target.device_name}: their numerics are checked here, not their tuning."
        )
    if notes.fp8_ran:
        parts.append(f"fp8 entries ran with {FP8_ACCUM_ENV}={fp8_accum_mode()}.")
    if batch_sizes is not None:
        parts.append(f"Only batch sizes {sorted(batch_sizes)} were checked.")
    return " ".join(parts)


def verify_tables(
    paths: list[Path] | list[str],
    *,
    K: int | None = None,
    topk: int | None = None,
    device: str | None = None,
    batch_sizes: list[int] | None = None,
    progress: Callable[[str], None] | None = None,
    schema_only: bool = False,
    seed: int = 0,
) -> VerifyReport:
    """Verify every table under ``paths`` (files or folders); see the module doc for the rules.

    ``device`` defaults to the first GPU, or the CPU when Triton's interpreter is on (it must be
    switched on, ``TRITON_INTERPRET=1``, before triton is imported). ``progress`` gets one line
    per result as it is produced. ValueError for a missing path, a non-positive K/topk, or a
    device the kernel cannot run on; never for a table's content.
    """
    for label, v in (("K", K), ("topk", topk)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{label} must be a positive integer, got {v!r}")
    files = collect_table_paths([Path(p) for p in paths])
    target = plan_target(device, schema_only)
    wanted = set(batch_sizes) if batch_sizes is not None else None
    notes = Notes()
    results: list[EntryResult] = []

    def emit(r: EntryResult) -> None:
        results.append(r)
        if progress is not None:
            where = Path(r.file).name + (f" M={r.batch_size}" if r.batch_size is not None else "")
            progress(f"{where}: {r.status}" + (f" ({r.reason})" if r.reason else ""))

    for path in files:
        _verify_file(path, target, K=K, topk=topk, batch_sizes=wanted, seed=seed, notes=notes,
                     emit=emit)  # fmt: skip
    device_text = (
        "none (schema only)"
        if not target.run
        else "cpu (Triton interpreter)"
        if target.interpreter
        else f"{target.device_name} ({target.device})"
    )
    return VerifyReport(
        results, device_text, target.interpreter, _note(target, notes, wanted), schema_only
    )
