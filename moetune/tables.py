"""vLLM's fused-MoE config tables (DESIGN §3): file-name grammar, validated reading, atomic writing.

A table maps batch sizes to kernel meta-parameters. vLLM reads it with no checks at all and
passes every key of the chosen entry to the Triton launch, so a stray key or a bad value only
shows up as a crash (or a silent slowdown) inside someone's server. Everything here is therefore
strict about what goes in and explicit about what came out.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TABLE_KEYS_CUDA = (
    "BLOCK_SIZE_M",
    "BLOCK_SIZE_N",
    "BLOCK_SIZE_K",
    "GROUP_SIZE_M",
    "num_warps",
    "num_stages",
)
TABLE_KEYS_ROCM_EXTRA = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
# Further keys in vLLM 0.33.0's shipped Triton tables: SPLIT_K (always 1; vLLM's launch drops
# it), num_ctas (one L40S table) and grf_mode (Intel XPU tables, a string such as "256").
TABLE_KEYS_OTHER = ("SPLIT_K", "num_ctas", "grf_mode")
# What vLLM's own default configs always set; num_warps/num_stages fall back to Triton's defaults.
REQUIRED_KEYS = TABLE_KEYS_CUDA[:4]
# Tables named ",backend=X" hold another kernel's parameters (vLLM 0.33.0: FlyDSL on ROCm).
BACKEND_KEYS = {"flydsl": ("tile_m", "tile_n", "tile_k", "tile_n2", "tile_k2")}

_POW2 = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps"}
_NON_NEGATIVE = {"waves_per_eu", "matrix_instr_nonkdim"}  # 0 means "let the compiler choose"
_TRITON_KEYS = TABLE_KEYS_CUDA + TABLE_KEYS_ROCM_EXTRA + TABLE_KEYS_OTHER

Entry = dict[str, Any]  # values are ints, except grf_mode which XPU tables write as a string

_INT = r"[1-9][0-9]*"
_NAME_RE = re.compile(
    rf"E=(?P<E>{_INT}),N=(?P<N>{_INT}),device_name=(?P<device>[^,/\s=]+?)"
    r"(?:,dtype=(?P<dtype>[A-Za-z0-9_]+?))?"
    rf"(?:,block_shape=\[(?P<bn>{_INT}), ?(?P<bk>{_INT})\])?"
    r"(?P<pcq>,per_channel_quant=True)?"
    r"(?:,backend=(?P<backend>[A-Za-z0-9_]+?))?"
    r"(?P<suffix>_down)?\.json"
)
_SIDECAR_SUFFIX = ".provenance.json"
# The op's two GEMMs and the suffix each one's table carries: the up projection (w1, gate and up
# stacked) has vLLM's name; the down projection (w2) has SGLang's "_down" before ".json".
GEMM_SUFFIXES = {"up": "", "down": "_down"}


def gemm_suffix(gemm: str) -> str:
    """The file-name suffix of ``gemm``'s table ("up" or "down"); ValueError for anything else."""
    if gemm not in GEMM_SUFFIXES:
        raise ValueError(f"gemm must be one of {', '.join(GEMM_SUFFIXES)}, got {gemm!r}")
    return GEMM_SUFFIXES[gemm]


class TableError(ValueError):
    """A table that vLLM would mis-read or crash on; names the file and the batch-size key."""

    def __init__(self, path: str | os.PathLike[str], key: str | None, reason: str) -> None:
        self.path = Path(path)
        self.key = key
        self.reason = reason
        where = f'{self.path.name}: key "{key}"' if key is not None else self.path.name
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class TableName:
    """The parts of a table file name; ``filename`` renders it the way vLLM looks it up."""

    E: int
    N: int
    device_name: str
    dtype: str | None = None
    block_shape: tuple[int, int] | None = None
    suffix: str = ""  # "_down": SGLang's separate down-projection table
    backend: str | None = None  # vLLM's non-Triton tables, e.g. "flydsl"
    per_channel_quant: bool = False  # SGLang only

    @property
    def gemm(self) -> str:
        """Which GEMM the table is for: "down" for a ``_down`` table, else "up" (vLLM's tables
        serve both GEMMs; moetune's op reads them for the up projection)."""
        return "down" if self.suffix == GEMM_SUFFIXES["down"] else "up"

    @property
    def filename(self) -> str:
        return table_filename(
            self.E,
            self.N,
            self.device_name,
            self.dtype,
            self.block_shape,
            backend=self.backend,
            per_channel_quant=self.per_channel_quant,
            suffix=self.suffix,
        )


def _check_name_parts(E: int, N: int, device_name: str, dtype: str | None) -> None:
    for label, value in (("E", E), ("N", N)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not device_name or re.search(r"[\s,/=]", device_name):
        raise ValueError(
            f"device name {device_name!r} must be non-empty with no whitespace, ',', '/' or '=' "
            "(pass it through platform.normalize_device_name)"
        )
    if dtype is not None and not re.fullmatch(r"[A-Za-z0-9_]+", dtype):
        raise ValueError(f"dtype {dtype!r} must be letters, digits and '_'")


def _block_part(block_shape: tuple[int, int] | list[int] | None, sep: str) -> str:
    # Like vLLM and SGLang: no part at all when the shape is absent or has a zero in it.
    if not block_shape or not all(block_shape):
        return ""
    bn, bk = block_shape
    if bn < 0 or bk < 0:
        raise ValueError(f"block_shape must be non-negative, got {list(block_shape)}")
    return f",block_shape=[{bn},{sep}{bk}]"


def table_filename(
    E: int,
    N: int,
    device_name: str,
    dtype: str | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    *,
    backend: str | None = None,
    per_channel_quant: bool = False,
    suffix: str = "",
) -> str:
    """``E=..,N=..,device_name=..[,dtype=..][,block_shape=[bn,bk]].json``, vLLM's spelling.

    ``dtype`` is None for bf16/fp16 (vLLM writes no dtype part for them). The keyword-only parts
    exist so every shipped or SGLang name can be rendered back; moetune's own tables use only
    ``suffix`` (``gemm_suffix("down")``, for the down projection's table).
    """
    _check_name_parts(E, N, device_name, dtype)
    dtype_part = f",dtype={dtype}" if dtype else ""
    pcq_part = ",per_channel_quant=True" if per_channel_quant else ""
    backend_part = f",backend={backend}" if backend else ""
    return (
        f"E={E},N={N},device_name={device_name}{dtype_part}{_block_part(block_shape, '')}"
        f"{pcq_part}{backend_part}{suffix}.json"
    )


def sglang_filename(
    E: int,
    N: int,
    device_name: str,
    dtype: str | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    *,
    per_channel_quant: bool = False,
    down: bool = False,
) -> str:
    """The name SGLang's ``get_config_file_name`` gives the same table.

    SGLang kept vLLM's grammar with three differences: the block shape is Python's list repr, so
    it has a space (``block_shape=[128, 128]``); ``,per_channel_quant=True`` marks per-channel
    tables; and the down-projection table (``down_moe``) gets ``_down`` before ``.json``. Its
    device part is ``get_device_name().replace(" ", "_")`` with no H200 folding, and the files
    live in ``configs/triton_<x>_<y>_<z>/`` (see :func:`sglang_version_dir`).
    """
    _check_name_parts(E, N, device_name, dtype)
    dtype_part = f",dtype={dtype}" if dtype else ""
    pcq_part = ",per_channel_quant=True" if per_channel_quant else ""
    return (
        f"E={E},N={N},device_name={device_name}{dtype_part}{_block_part(block_shape, ' ')}"
        f"{pcq_part}{'_down' if down else ''}.json"
    )


def sglang_version_dir(triton_version: str) -> str:
    """SGLang's per-Triton-version folder name: ``3.4.0`` -> ``triton_3_4_0``."""
    return "triton_" + triton_version.replace(".", "_")


def parse_table_filename(name: str) -> TableName:
    """The parts of a vLLM (or SGLang) table file name; ValueError for anything else."""
    if name.endswith(_SIDECAR_SUFFIX):
        raise ValueError(f"{name!r} is a provenance sidecar, not a table")
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise ValueError(
            f"{name!r} is not a table file name "
            "(E=<int>,N=<int>,device_name=<name>[,dtype=<dtype>][,block_shape=[<n>,<k>]].json)"
        )
    block = (int(m["bn"]), int(m["bk"])) if m["bn"] else None
    return TableName(
        E=int(m["E"]),
        N=int(m["N"]),
        device_name=m["device"],
        dtype=m["dtype"],
        block_shape=block,
        suffix=m["suffix"] or "",
        backend=m["backend"],
        per_channel_quant=m["pcq"] is not None,
    )


def sidecar_path(table_path: str | os.PathLike[str]) -> Path:
    """``<stem>.provenance.json`` beside the table; vLLM never opens it."""
    p = Path(table_path)
    return p.with_name(p.stem + _SIDECAR_SUFFIX)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _value_problem(key: str, v: object) -> str | None:
    if key == "grf_mode":
        ok = (isinstance(v, str) and v != "") or (_is_int(v) and v > 0)
        return None if ok else f"grf_mode must be a non-empty string or positive integer, got {v!r}"
    if key in _NON_NEGATIVE:
        return None if _is_int(v) and v >= 0 else f"{key} must be an integer >= 0, got {v!r}"
    if not _is_int(v) or v <= 0:
        return f"{key} must be a positive integer, got {v!r}"
    if key in _POW2 and v & (v - 1):
        return f"{key} must be a power of two, got {v}"
    if key == "kpack" and v not in (1, 2):
        return f"kpack must be 1 or 2, got {v}"
    return None


def entry_problem(
    entry: object,
    *,
    backend: str | None = None,
    complete: bool = False,
    rocm_keys: bool = True,
) -> str | None:
    """Why vLLM could not launch with this entry, or None when it can.

    ``complete`` asks for all of TABLE_KEYS_CUDA (what moetune writes); otherwise the four block
    keys suffice. ``rocm_keys=False`` rejects the AMD-only keys (an NVIDIA table). Other
    backends' tables are checked against their own key set.
    """
    if not isinstance(entry, Mapping):
        return f"value must be an object of kernel parameters, got {type(entry).__name__}"
    if backend is not None:
        known: tuple[str, ...] = BACKEND_KEYS.get(backend, ())
        required = known
    else:
        known = _TRITON_KEYS if rocm_keys else TABLE_KEYS_CUDA + TABLE_KEYS_OTHER
        required = TABLE_KEYS_CUDA if complete else REQUIRED_KEYS
    for key in required:
        if key not in entry:
            return f"missing {key}"
    for key, v in entry.items():
        if known and key not in known:
            if not rocm_keys and key in TABLE_KEYS_ROCM_EXTRA:
                return f"{key} is a ROCm-only key and this is an NVIDIA table"
            return f"unknown key {key!r} (vLLM passes every key to the kernel launch)"
        problem = _value_problem(str(key), v)
        if problem:
            return problem
    return None


def _rocm_keys_allowed(name: TableName | None) -> bool:
    return name is None or not name.device_name.startswith("NVIDIA")


@dataclass(frozen=True)
class Table:
    """A loaded table; ``entries`` is sorted by batch size (``triton_version`` kept apart)."""

    name: TableName | None
    triton_version: str | None
    entries: dict[int, Entry] = field(default_factory=dict)
    path: Path | None = None

    def lookup(self, M: int) -> Entry:
        return nearest_entry(self.entries, M)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(Exception):
    pass


_BATCH_KEY_RE = re.compile(r"[1-9][0-9]{0,17}")  # also keeps int() clear of its digit limit


def load_table(path: str | os.PathLike[str]) -> Table:
    """Read and validate one table; every problem (unreadable, bad JSON, bad entry) is a TableError.

    Stricter than vLLM on purpose: duplicate keys (JSON keeps the last silently), leading zeros
    in batch sizes and empty tables are errors here, because vLLM would quietly pick something.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise TableError(p, None, f'key "{e}" appears more than once') from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TableError(p, None, f"not a readable JSON table ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise TableError(p, None, f"top level must be a JSON object, got {type(doc).__name__}")
    try:
        name: TableName | None = parse_table_filename(p.name)
    except ValueError:
        name = None
    backend = name.backend if name else None
    triton_version = doc.pop("triton_version", None)
    if triton_version is not None and not isinstance(triton_version, str):
        raise TableError(p, "triton_version", f"must be a string, got {triton_version!r}")
    entries: dict[int, Entry] = {}
    for key, value in doc.items():
        if not _BATCH_KEY_RE.fullmatch(key):
            raise TableError(p, key, "batch-size keys must be positive integers without sign or 0s")
        problem = entry_problem(value, backend=backend, rocm_keys=_rocm_keys_allowed(name))
        if problem:
            raise TableError(p, key, problem)
        entries[int(key)] = dict(value)
    if not entries:
        raise TableError(p, None, "no batch-size entries")
    return Table(name, triton_version, dict(sorted(entries.items())), p)


def nearest_entry(entries: Mapping[int, Entry], M: int) -> Entry:
    """The entry whose batch size is closest to M; a tie goes to the smaller batch size.

    vLLM does ``min(configs.keys(), key=lambda x: abs(x - M))`` over the keys in file order, so a
    tie goes to whichever key the file lists first: the smaller one for every sorted table
    (all that moetune writes). Sorting here makes the answer independent of dict order.
    """
    if not entries:
        raise ValueError("no entries to choose from")
    return entries[min(sorted(entries), key=lambda k: abs(k - M))]


def _atomic_write(path: Path, text: str) -> None:
    """Write beside the target, fsync, then rename over it: readers see the old file or the new."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(
    path: str | os.PathLike[str],
    entries: Mapping[int, Mapping[str, Any]],
    *,
    triton_version: str,
    sidecar: Mapping[str, Any] | None = None,
) -> Path:
    """Write a table vLLM reads unchanged (keys ascending, indent 4) and its optional sidecar.

    Every entry must carry all of TABLE_KEYS_CUDA and nothing vLLM would choke on; provenance
    goes to ``sidecar_path(path)``, never into the table (without one, a stale sidecar is removed).
    Both files are written atomically, after everything is validated and serialized.
    """
    p = Path(path)
    try:
        name: TableName | None = parse_table_filename(p.name)
    except ValueError:
        name = None
    backend = name.backend if name else None
    if not isinstance(triton_version, str) or not triton_version:
        raise TableError(
            p, None, f"triton_version must be a non-empty string, got {triton_version!r}"
        )
    if not entries:
        raise TableError(p, None, "no batch-size entries")
    doc: dict[str, Any] = {"triton_version": triton_version}
    for batch in sorted(entries, key=lambda b: b if _is_int(b) else 0):
        if not _is_int(batch) or batch <= 0:
            raise TableError(p, str(batch), "batch sizes must be positive integers")
        entry = entries[batch]
        problem = entry_problem(
            entry, backend=backend, complete=True, rocm_keys=_rocm_keys_allowed(name)
        )
        if problem:
            raise TableError(p, str(batch), problem)
        doc[str(batch)] = dict(entry)  # caller's key order: a rewritten vLLM table diffs clean
    text = json.dumps(doc, indent=4) + "\n"
    side_text = None
    if sidecar is not None:
        try:
            side_text = json.dumps(sidecar, indent=4, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise TableError(p, None, f"provenance sidecar is not JSON-serializable: {e}") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, text)
    if side_text is not None:
        _atomic_write(sidecar_path(p), side_text)
    else:  # an older sidecar would now describe a table that is gone
        sidecar_path(p).unlink(missing_ok=True)
    return p
