"""Planning a verify run: per table file and entry, what problem and config run, on which device.

Split from :mod:`moetune.verify` so the decisions (which preset supplies K and topk, the
interpreter's stand-in problem, which entry keys are dropped, clamped, capped or refused) sit apart
from running the entries and reporting. The rules are in :mod:`moetune.verify`'s module doc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moetune.launch import LAUNCH_KEYS, META_KEYS, ROCM_KEYS, clamp_block_k, validate_config
from moetune.platform import detect_platform
from moetune.presets import MODEL_PRESETS, ModelPreset
from moetune.problem import Problem
from moetune.tables import TableName

DEFAULT_K = 4096
DEFAULT_TOPK = 2
PRESET_TPS = (1, 2, 4, 8)
# The interpreter's stand-in problem (M is chosen per entry by moetune.verify) and its cap on
# BLOCK sizes; see moetune.verify's module doc.
STAND_IN_E, STAND_IN_N, STAND_IN_K = 4, 32, 64
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
class Target:
    """Where and how entries run: the GPU, the interpreter on CPU, or nowhere (schema only)."""

    run: bool  # False: schema only
    interpreter: bool
    rocm: bool
    device: str
    device_name: str
    fp8_dtype: torch.dtype


@dataclass
class Notes:
    """What the plan changed across all files, for the report's note."""

    rocm_dropped: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)
    capped: bool = False
    fp8_ran: bool = False  # an fp8_w8a8 entry ran on a GPU (its accumulation mode matters)


@dataclass(frozen=True)
class FilePlan:
    """One table file's problem, shared by all its entries."""

    name: TableName
    problem: Problem  # what runs (the stand-in in the interpreter)
    describe: str  # problem text, without M


def kernel_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from moetune.kernel import fused_moe_kernel

    return isinstance(fused_moe_kernel, InterpretedFunction)


def plan_target(device: str | None, schema_only: bool) -> Target:
    """The run's target; ValueError when the kernel cannot run on ``device``."""
    if schema_only:
        return Target(False, False, True, "none", "none", torch.float8_e4m3fn)
    interpreted = kernel_is_interpreted()
    if interpreted:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(
                f"Triton's interpreter is on (TRITON_INTERPRET=1): the kernel runs on CPU "
                f"tensors, not on {device!r}"
            )
        return Target(True, True, False, "cpu", "cpu", torch.float8_e4m3fn)
    dev = torch.device(device or "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"cannot run the kernel on {dev}: it is compiled for the GPU and "
            "Triton's interpreter is off (set TRITON_INTERPRET=1 before importing triton)"
        )
    platform = detect_platform(dev.index or 0)
    return Target(
        True, False, platform.is_rocm, str(dev), platform.device_name, platform.fp8_torch_dtype
    )


def preset_for(E: int, N: int) -> tuple[ModelPreset | None, int | None]:
    """The first preset (tp = 1, 2, 4, 8) whose E and intermediate size match the table."""
    for tp in PRESET_TPS:
        for preset in MODEL_PRESETS.values():
            if preset.E == E and preset.intermediate == N * tp:
                return preset, tp
    return None, None


def plan_file(name: TableName, target: Target, K: int | None, topk: int | None) -> FilePlan:
    """The problem to run a table's entries on; ValueError (the skip reason) when there is none."""
    if name.backend is not None:
        raise ValueError(f"backend={name.backend} table: parameters of another kernel")
    if name.dtype not in _FILE_DTYPES:
        raise ValueError(f"dtype={name.dtype}: not a dtype moetune runs")
    dtype, quant = _FILE_DTYPES[name.dtype]
    if name.block_shape is not None and quant not in ("fp8_w8a8", "int8_w8a8"):
        raise ValueError(
            f"block_shape={list(name.block_shape)} without a w8a8 dtype: vLLM passes a block "
            "shape only with a block quantization, so the quantization is unknown"
        )
    preset, tp = preset_for(name.E, name.N)
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
        return FilePlan(name, real, real.describe() + src)
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
    return FilePlan(name, stand_in, f"stand-in {stand_in.describe()} for {real.describe()}{src}")


def entry_config(
    entry: dict[str, Any], plan: FilePlan, target: Target, notes: Notes
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

    def clamp(block: tuple[int, int] | None, what: str) -> None:
        old = clamp_block_k(cfg, block)
        if old is not None:
            changes.append(f"BLOCK_SIZE_K {old}->{cfg['BLOCK_SIZE_K']}: clamped to {what}")

    real_block = plan.name.block_shape
    clamp(real_block, f"block_shape {list(real_block or [])} as vLLM's launch does")
    if target.interpreter:
        for k in _BLOCK_KEYS:
            if cfg[k] > INTERPRETER_BLOCK_CAP:
                changes.append(f"{k} {cfg[k]}->{INTERPRETER_BLOCK_CAP} (interpreter cap)")
                cfg[k] = INTERPRETER_BLOCK_CAP
                notes.capped = True
        block = plan.problem.block_shape
        clamp(block, f"the stand-in block_shape {list(block or [])}")
    try:
        validate_config(cfg, plan.problem.block_shape)
    except ValueError as e:
        raise ValueError(f"moetune's kernel cannot run this entry: {e}") from None
    return cfg, changes
