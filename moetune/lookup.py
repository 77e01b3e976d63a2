"""Runtime config lookup (DESIGN §3): user folders, then shipped tables, then the heuristic.

Folders searched, in order:
1. ``$MOETUNE_CONFIG_DIR`` (moetune's own);
2. ``$VLLM_TUNED_CONFIG_FOLDER`` (the folder vLLM users already keep tuned tables in);
3. the tables shipped in moetune's ``configs/`` (also after a non-editable install).
The first file with the problem's vLLM name (or an alias of the device name) wins; within it the
entry of the nearest batch size. Without any file the heuristic of ``moetune.defaults`` is used
and a warning names the file that was looked for, once per file. Loaded tables are cached, so a
repeated lookup costs microseconds.

The down projection (``gemm="down"``) has its own table, named like the main one with ``_down``
before ``.json`` (SGLang's convention), looked for only in the folder the main table came from
(a ``_down`` table elsewhere was never checked with that main table). Without one the down GEMM
uses the main table's config, as vLLM does; a missing ``_down`` table is the usual case, so it
draws no warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from moetune.defaults import default_config
from moetune.launch import LAUNCH_KEYS, META_KEYS, ROCM_KEYS, clamp_block_k
from moetune.tables import (
    Table,
    TableError,
    gemm_suffix,
    load_table,
    nearest_entry,
    table_filename,
)

ENV_VARS = ("MOETUNE_CONFIG_DIR", "VLLM_TUNED_CONFIG_FOLDER")
_TABLE_DTYPES = {torch.float32: "float32"}
_warned: set[str] = set()
KERNEL_KEYS = frozenset(META_KEYS + LAUNCH_KEYS + ROCM_KEYS)


def shipped_config_dir() -> Path:
    """configs/ is installed as the package ``moetune.configs``; in a source tree it sits
    beside the package."""
    try:
        import moetune.configs as shipped
    except ImportError:
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(shipped.__file__).parent


def search_dirs() -> list[Path]:
    dirs = [Path(os.environ[v]) for v in ENV_VARS if os.environ.get(v)]
    return [*dirs, shipped_config_dir()]


def table_dtype(dtype: torch.dtype | str | None, quant: str | None) -> str | None:
    """The ``dtype=`` part of a table name for a compute dtype and quantization."""
    if quant is not None:
        return quant
    if isinstance(dtype, str):
        return "float32" if dtype in ("float32", "fp32") else None
    return _TABLE_DTYPES.get(dtype)


@functools.lru_cache(maxsize=1)
def _current_device_name() -> str:
    from moetune.platform import detect_platform

    return detect_platform().device_name


@functools.lru_cache(maxsize=256)
def _load_cached(path: str, mtime_ns: int) -> Table:
    return load_table(path)


def find_table(
    E: int,
    N: int,
    *,
    dtype: str | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    device_name: str | None = None,
    gemm: str = "up",
    folders: list[Path] | None = None,
) -> Table | None:
    """The first table for this problem (and ``gemm``: "up" or "down") in ``folders`` (default:
    the search folders), or None."""
    from moetune.platform import device_name_aliases

    suffix = gemm_suffix(gemm)
    device_name = device_name or _current_device_name()
    bs = tuple(block_shape) if block_shape is not None else None
    names = [
        table_filename(E, N, d, dtype, bs, suffix=suffix) for d in device_name_aliases(device_name)
    ]
    for folder in folders if folders is not None else search_dirs():
        for name in names:
            path = folder / name
            try:
                st = path.stat()
            except OSError:
                continue
            try:
                return _load_cached(str(path), st.st_mtime_ns)
            except TableError as e:
                _warn_once(str(path), f"moetune: ignoring unreadable config table: {e}")
    return None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def get_config(
    M: int,
    E: int,
    N: int,
    *,
    dtype: str | None = None,
    block_shape: tuple[int, int] | list[int] | None = None,
    device_name: str | None = None,
    K: int | None = None,
    topk: int | None = None,
    gemm: str = "up",
) -> dict[str, Any]:
    """The config for batch size ``M``: nearest entry of the first matching table, else the
    heuristic default (``K``/``topk`` refine it; without them a 4096-wide top-2 layer is assumed).

    ``dtype`` is the table's dtype name: None (bf16/fp16), "float32", "fp8_w8a8", "int8_w8a8" or
    "int8_w8a16". ``gemm="down"`` reads the ``_down`` table beside the main table (only there:
    a ``_down`` table from another folder was never checked with this main table) and, without
    one, answers what the up projection would get.
    """
    table = find_table(E, N, dtype=dtype, block_shape=block_shape, device_name=device_name)
    if table is not None and gemm_suffix(gemm):
        down = find_table(E, N, dtype=dtype, block_shape=block_shape, device_name=device_name,
                          gemm=gemm, folders=[Path(table.path).parent])  # fmt: skip
        if down is not None:
            return dict(nearest_entry(down.entries, M))
    if table is not None:
        return dict(nearest_entry(table.entries, M))
    wanted = table_filename(
        E, N, device_name or _current_device_name(), dtype,
        tuple(block_shape) if block_shape is not None else None,
    )  # fmt: skip
    _warn_once(wanted, f"moetune: no tuned config table {wanted}; using the heuristic default")
    quant = dtype if dtype in ("fp8_w8a8", "int8_w8a8", "int8_w8a16") else None
    compute = torch.float32 if dtype == "float32" else torch.bfloat16
    bs = tuple(block_shape) if block_shape is not None else None
    return default_config(M, E, N, K or 4096, topk or 2, dtype=compute, quant=quant, block_shape=bs)


def config_for(
    M: int,
    E: int,
    N: int,
    K: int,
    topk: int,
    *,
    dtype: torch.dtype,
    quant: str | None,
    block_shape: tuple[int, int] | None,
    gemm: str = "up",
) -> dict[str, Any]:
    """What ``fused_experts(config=None)`` runs ``gemm`` ("up" or "down") with.

    Keys the kernel does not take (another backend's, e.g. ``SPLIT_K``) are dropped, and for
    block quantization BLOCK_SIZE_K is clamped to min(block_n, block_k), as vLLM does at
    launch, so any table vLLM accepts runs here.
    """
    cfg = get_config(
        M, E, N, dtype=table_dtype(dtype, quant), block_shape=block_shape, K=K, topk=topk,
        gemm=gemm,
    )  # fmt: skip
    cfg = {k: v for k, v in cfg.items() if k in KERNEL_KEYS}
    clamp_block_k(cfg, block_shape)
    return cfg
