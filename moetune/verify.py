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
  other backends (``,backend=flydsl``), SGLang's ``_down`` tables, a block shape without a
  quantization, a name that does not parse.
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
  reproduces), a NaN-poisoned workspace, and :func:`moetune.check.check_close` against the
  float64 reference. Tables for another device run here too: numerics only, and ``note`` says so.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moetune.check import check_close
from moetune.launch import LAUNCH_KEYS, META_KEYS, ROCM_KEYS, validate_config
from moetune.platform import detect_platform, device_name_aliases
from moetune.presets import MODEL_PRESETS
from moetune.problem import Problem
from moetune.tables import TableError, TableName, load_table, parse_table_filename

STATUSES = ("ok", "failed", "invalid", "skipped")
INTERPRETER_NOTE = (
    "Interpreter run on CPU: entries checked on a tiny stand-in problem, not the table's shape; "
    "timings and GPU-specific failures are not covered."
)
DEFAULT_K = 4096
DEFAULT_TOPK = 2
PRESET_TPS = (1, 2, 4, 8)
# The interpreter's stand-in problem and its cap on BLOCK sizes (see the module doc).
STAND_IN_E, STAND_IN_N, STAND_IN_K, STAND_IN_M = 4, 32, 64, 8
STAND_IN_BLOCK = (32, 32)
INTERPRETER_BLOCK_CAP = 64

# File dtype part -> (compute dtype or None for the platform's default, quantization).
_FILE_DTYPES: dict[str | None, tuple[str | None, str | None]] = {
    None: (None, None),
    "bf16": ("bfloat16", None),
    "float32": ("float32", None),
    "fp8_w8a8": (None, "fp8_w8a8"),
    "int8_w8a8": (None, "int8_w8a8"),
    "int8_w8a16": (None, "int8_w8a16"),
}
_KERNEL_KEYS = frozenset(META_KEYS + LAUNCH_KEYS + ROCM_KEYS)
_BLOCK_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")


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


@dataclass(frozen=True)
class _Target:
    run: bool  # False: schema only
    interpreter: bool
    rocm: bool
    device: str
    device_name: str
    fp8_dtype: torch.dtype


@dataclass
class _Notes:
    rocm_dropped: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)
    capped: bool = False


@dataclass(frozen=True)
class _FilePlan:
    name: TableName
    problem: Problem  # what runs (the stand-in in the interpreter)
    describe: str  # problem text, without M


def _kernel_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from moetune.kernel import fused_moe_kernel

    return isinstance(fused_moe_kernel, InterpretedFunction)


def _target(device: str | None, schema_only: bool) -> _Target:
    if schema_only:
        return _Target(False, False, True, "none", "none", torch.float8_e4m3fn)
    interpreted = _kernel_is_interpreted()
    if interpreted:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(
                f"Triton's interpreter is on (TRITON_INTERPRET=1): the kernel runs on CPU "
                f"tensors, not on {device!r}"
            )
        return _Target(True, True, False, "cpu", "cpu", torch.float8_e4m3fn)
    dev = torch.device(device or "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"cannot run the kernel on {dev}: it is compiled for the GPU and "
            "Triton's interpreter is off (set TRITON_INTERPRET=1 before importing triton)"
        )
    platform = detect_platform(dev.index or 0)
    return _Target(
        True, False, platform.is_rocm, str(dev), platform.device_name, platform.fp8_torch_dtype
    )


def _preset_for(E: int, N: int):
    for tp in PRESET_TPS:
        for preset in MODEL_PRESETS.values():
            if preset.E == E and preset.intermediate == N * tp:
                return preset, tp
    return None, None


def _plan_file(name: TableName, target: _Target, K: int | None, topk: int | None) -> _FilePlan:
    """The problem to run a table's entries on; ValueError (the skip reason) when there is none."""
    if name.backend is not None:
        raise ValueError(f"backend={name.backend} table: parameters of another kernel")
    if name.suffix:
        raise ValueError(f"SGLang {name.suffix} table: used for one GEMM only, not this op")
    if name.dtype not in _FILE_DTYPES:
        raise ValueError(f"dtype={name.dtype}: not a dtype moetune runs")
    dtype, quant = _FILE_DTYPES[name.dtype]
    if name.block_shape is not None and quant not in ("fp8_w8a8", "int8_w8a8"):
        raise ValueError(
            f"block_shape={list(name.block_shape)} without a w8a8 dtype: vLLM passes a block "
            "shape only with a block quantization, so the quantization is unknown"
        )
    preset, tp = _preset_for(name.E, name.N)
    sources = []
    if K is None or topk is None:
        if preset is not None:
            sources.append(f"from preset {preset.name} at tp={tp}")
        else:
            sources.append(f"defaults: no preset has E={name.E} and N·tp={name.N}·tp")
    K_used = K if K is not None else (preset.K if preset else DEFAULT_K)
    topk_used = topk if topk is not None else (preset.topk if preset else DEFAULT_TOPK)
    if topk_used > name.E:
        if topk is not None or preset is not None:
            sources.append(f"topk {topk_used} capped at E={name.E}")
        topk_used = name.E
    bias = preset.bias if preset else False
    activation = preset.activation if preset else "silu"
    dtype = dtype or "bfloat16"
    real = Problem(
        E=name.E, N=name.N, K=K_used, topk=topk_used, dtype=dtype, quant=quant,
        block_shape=name.block_shape, per_channel=name.per_channel_quant, bias=bias,
        activation=activation,
    )  # fmt: skip
    if not target.interpreter:
        src = f" ({'; '.join(sources)})" if sources else ""
        return _FilePlan(name, real, real.describe() + src)
    if dtype == "bfloat16":
        dtype = "float16"
        sources.append("float16 for bfloat16: the interpreter has no bfloat16 tl.dot")
    src = f" ({'; '.join(sources)})" if sources else ""
    E = min(name.E, STAND_IN_E)
    stand_in = Problem(
        E=E, N=STAND_IN_N, K=STAND_IN_K, topk=min(topk_used, E), dtype=dtype, quant=quant,
        block_shape=STAND_IN_BLOCK if name.block_shape else None,
        per_channel=name.per_channel_quant, bias=bias, activation=activation,
    )  # fmt: skip
    return _FilePlan(name, stand_in, f"stand-in {stand_in.describe()} for {real.describe()}{src}")


def _entry_config(
    entry: dict[str, Any], plan: _FilePlan, target: _Target, notes: _Notes
) -> tuple[dict[str, Any], list[str]]:
    """The config to launch and what was changed; ValueError (the skip reason) when none."""
    foreign = sorted(k for k in entry if k not in _KERNEL_KEYS)
    if foreign:
        raise ValueError(f"entry has {', '.join(foreign)}, which moetune's kernel does not take")
    cfg = dict(entry)
    changes: list[str] = []
    if target.run and not target.rocm:
        dropped = [k for k in ROCM_KEYS if k in cfg]
        for k in dropped:
            del cfg[k]
        notes.rocm_dropped.update(dropped)
    real_block = plan.name.block_shape
    if real_block is not None and cfg["BLOCK_SIZE_K"] > min(real_block):
        changes.append(
            f"BLOCK_SIZE_K {cfg['BLOCK_SIZE_K']}->{min(real_block)}: clamped to "
            f"block_shape {list(real_block)} as vLLM's launch does"
        )
        cfg["BLOCK_SIZE_K"] = min(real_block)
    if target.interpreter:
        for k in _BLOCK_KEYS:
            if cfg[k] > INTERPRETER_BLOCK_CAP:
                changes.append(f"{k} {cfg[k]}->{INTERPRETER_BLOCK_CAP} (interpreter cap)")
                cfg[k] = INTERPRETER_BLOCK_CAP
                notes.capped = True
        block = plan.problem.block_shape
        if block is not None and cfg["BLOCK_SIZE_K"] > min(block):
            changes.append(
                f"BLOCK_SIZE_K {cfg['BLOCK_SIZE_K']}->{min(block)}: clamped to the stand-in "
                f"block_shape {list(block)}"
            )
            cfg["BLOCK_SIZE_K"] = min(block)
    try:
        validate_config(cfg, plan.problem.block_shape)
    except ValueError as e:
        raise ValueError(f"moetune's kernel cannot run this entry: {e}") from None
    return cfg, changes


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[0]
    # Triton's CompilationError opens with "at L:C:" and the source; the message comes last.
    if re.fullmatch(r"at \d+:\d+:?", line):
        line = lines[-1]
    return f"{type(e).__name__}: {line}"


def _run_entry(plan: _FilePlan, M: int, cfg: dict[str, Any], target: _Target, seed: int):
    """``(ok, reason, rel_err, worst_row_err)`` of one entry; exceptions propagate."""
    from moetune.inputs import random_moe_inputs
    from moetune.ops import fused_experts, poisoned_workspace
    from moetune.reference import fused_experts_reference

    p = plan.problem
    args, kwargs = random_moe_inputs(p, M, target.device, seed=seed, fp8_dtype=target.fp8_dtype)
    with poisoned_workspace():
        out = fused_experts(*args, **kwargs, config=cfg)
    ref = fused_experts_reference(*args, **kwargs)
    if target.device.startswith("cuda"):
        torch.cuda.synchronize(target.device)
    res = check_close(out, ref, dtype=p.torch_dtype, quant=p.quant)
    return res.ok, res.reason, res.rel_err, res.worst_row_err


def _verify_file(
    path: Path,
    target: _Target,
    *,
    K: int | None,
    topk: int | None,
    batch_sizes: set[int] | None,
    seed: int,
    notes: _Notes,
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
        plan = _plan_file(name, target, K, topk)
    except ValueError as e:
        emit(EntryResult(fname, None, "skipped", str(e), None, ""))
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
            cfg, changes = _entry_config(entry, plan, target, notes)
        except ValueError as e:
            emit(EntryResult(fname, bs, "skipped", str(e), dict(entry), problem))
            continue
        if not target.run:
            emit(EntryResult(fname, bs, "ok", "; ".join(["not run", *changes]), cfg, problem))
            continue
        entry_seed = (zlib.crc32(f"{path.name}:{bs}".encode()) + seed) % 2**63
        try:
            ok, why, rel, worst = _run_entry(plan, M, cfg, target, entry_seed)
        except Exception as e:  # a fault in one entry never stops the run
            ok, why, rel, worst = False, _first_line(e), None, None
            if target.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if not ok and foreign:
            why += f" (table is for {name.device_name}, ran on {target.device_name})"
        status = "ok" if ok else "failed"
        reason = "; ".join(([] if ok else [why]) + changes)
        emit(EntryResult(fname, bs, status, reason, cfg, problem, rel, worst))


def _note(target: _Target, notes: _Notes, batch_sizes: set[int] | None) -> str:
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
    target = _target(device, schema_only)
    wanted = set(batch_sizes) if batch_sizes is not None else None
    notes = _Notes()
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
