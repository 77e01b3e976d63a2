"""Launching one fused-MoE GEMM: check the config, pick pointers and strides, launch the kernel."""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: Triton 3.4 on
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover (older Triton: pointer loads only)
    TensorDescriptor = None
# griddepcontrol in kernels (tl.extra.cuda.gdc_wait) and the launch_pdl option (3.6 has both).
try:
    from triton.language.extra.cuda import gdc_wait as _gdc_wait  # noqa: F401
except ImportError:  # pragma: no cover (older Triton: no dependent launches)
    _HAS_PDL = False
else:
    _HAS_PDL = True

from moetune.accum import fp8_max_imprecise_acc
from moetune.activation import SWIGLU_ALPHA, SWIGLU_LIMIT
from moetune.align import DirectSlots, RoutingBlocks
from moetune.kernel import fused_moe_kernel
from moetune.quant import FP8_DTYPES, quant_max
from moetune.quant_kernel import fp8_min_exp

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# The kernel's ACTIVATION codes (0: the plain GEMM).
ACTIVATION_CODES = {"silu": 1, "swigluoai": 2}
# silu's gate and up rows interleaved in the fused epilogue's tile (the kernel's SILU_PAIRS) with
# pointer loads. Off: on an H100 the pairs were no faster than the stacked-halves tile (42
# points: 1.261 against 1.256 time/floor, results/kernels/NOTES.md §18); TMA loads take the
# pairs tile regardless (two half tiles into two accumulators). Changing the default changes the
# kernel's timings: bump the version (part of a sweep journal's identity) with it.
SILU_PAIRS = False
# Load the weights' tiles with Hopper's TMA (a host-side tensor descriptor of B viewed as
# [E * N, K]) where the GPU and B allow it (:func:`weights_tma`), for tiles of at least
# WEIGHTS_TMA_MIN_BLOCK_M rows; pointer loads otherwise. On an H100 TMA was 0-7% faster with the
# 64- and 128-row tiles of prefill and up to 15% slower with the 16-row tiles of decode
# (results/kernels/NOTES.md §18). Changing either changes the kernel's timings: bump the version.
WEIGHTS_TMA = True
WEIGHTS_TMA_MIN_BLOCK_M = 64
# Block quantization: load one weight scale per K step where the tile's columns share one
# (block_shape's N) group, not a gathered vector of BLOCK_SIZE_N (:func:`block_scale_per_tile`).
# Changing it changes the kernel's timings: bump the version with it.
BLOCK_SCALE_PER_TILE = True
# A GEMM whose input rows are in the routing's sorted order (moetune.ops.SORTED_MIN_M,
# SORTED_INPUT_MIN_M, SORTED_AUTO_MIN_M) loads them through TMA where the GPU allows it
# (sorted_input_tma), from WEIGHTS_TMA_MIN_BLOCK_M rows.
SORTED_TMA = True
# Programmatic dependent launch (NVIDIA compute capability 9 and up, a Triton with it): GEMM2
# and the sum over top-k launch with Triton's launch_pdl, so their programs may start while the
# kernel before them (in the op: GEMM1, the activation, a quantization or a fill) finishes. Every
# GEMM and sum program waits for the kernel before it to complete and flush
# (griddepcontrol.wait; at once where it was not launched as a dependent) before it touches
# memory, and lets its own dependents launch (griddepcontrol.launch_dependents: before the wait,
# or after the GEMM's K loop, PDL_TRIGGER). 2-3 µs faster a call at 36 of 42 points on an H100,
# up to 13% at M=1 (results/kernels/NOTES.md §22). Changing it changes the op's timings: bump the
# version.
PDL = True
# GEMM1 launches as a dependent too where the kernel ahead of it is the op's own (the routing
# launch, or the input's quantization: ops.gemm1_dependent), and those kernels let their
# dependents launch first thing (the quantization kernels wherever they run: ahead of GEMM2 too,
# where they re-quantize its input with dynamic, per-token or block scales). Never where the
# kernel ahead may be the caller's (a one-token bf16 launch): GEMM1's programs waiting on the
# SMs cost Mixtral and gpt-oss 10% at M=1 there (results/kernels/NOTES.md §22, run0). On an
# H100 0.06-2.5 µs faster a call at each of the 27 points M = 1-512 it changes (§25). Changing it
# changes the op's timings: bump the version.
PDL_GEMM1 = True
# Where both GEMMs' programs let their dependents launch: first thing ("early"), after the K loop
# ("late"), or "auto": late in GEMM1 (whose dependent is GEMM2) of a one-token launch (direct
# slots, an exact grid) of at least PDL_LATE_MIN_PROGRAMS programs, early otherwise. On an H100
# the early trigger cost Mixtral and gpt-oss bf16 at M=1 (GEMM1: 896 and 720 programs, several
# waves) 2-4% where the late one did not; late cost Qwen3 at M=1 (GEMM1 96 programs) 2-6%, and
# late in GEMM2 (512 programs, ahead of the small sum kernel) 0.5 µs; from M=8 up the two were
# within 1% (results/kernels/NOTES.md §23). The sum's programs always signal first.
PDL_TRIGGER = "auto"
PDL_LATE_MIN_PROGRAMS = 400
META_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")
LAUNCH_KEYS = ("num_warps", "num_stages")
_compile_only = False


@contextmanager
def compile_only() -> Iterator[None]:
    """Within this block the GEMMs are compiled into Triton's cache but not launched, and the op
    runs its other steps in PyTorch (GPU hosts only: compile processes use it with CPU tensors,
    so they launch nothing on a GPU being timed)."""
    global _compile_only
    saved, _compile_only = _compile_only, True
    try:
        yield
    finally:
        _compile_only = saved


def compiling() -> bool:
    """Whether the calling code runs inside :func:`compile_only`."""
    return _compile_only


ROCM_KEYS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


def validate_config(config: dict[str, Any], block_shape: tuple[int, int] | None = None) -> None:
    """Reject configs the kernel cannot run, with a ValueError naming the key."""
    for key in META_KEYS:
        if key not in config:
            raise ValueError(f"config is missing {key}")
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config {key} must be a positive integer, got {value!r}")
    for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        value = config[key]
        # tl.dot needs power-of-two tiles of at least 16 in every dimension.
        if value < 16 or value & (value - 1):
            raise ValueError(f"config {key} must be a power of two >= 16, got {value}")
    unknown = set(config) - set(META_KEYS) - set(LAUNCH_KEYS) - set(ROCM_KEYS)
    if unknown:
        raise ValueError(f"config has unknown keys: {', '.join(sorted(unknown))}")
    if block_shape is not None and block_shape[1] % config["BLOCK_SIZE_K"]:
        raise ValueError(
            f"config BLOCK_SIZE_K {config['BLOCK_SIZE_K']} must divide block_k {block_shape[1]}: "
            "a K tile may not straddle two scale groups"
        )


def clamp_block_k(config: dict[str, Any], block_shape: tuple[int, int] | None) -> int | None:
    """vLLM's launch-time rule for block quantization, applied in place: BLOCK_SIZE_K becomes
    at most min(block_n, block_k). Returns the old value when it changed, else None."""
    if block_shape is None:
        return None
    cap = min(block_shape)
    old = config.get("BLOCK_SIZE_K", 0)
    if old <= cap:
        return None
    config["BLOCK_SIZE_K"] = cap
    return old


def weights_tma(b: torch.Tensor, block_m: int, block_n: int, block_k: int) -> bool:
    """Whether the kernel loads weights ``b`` ([E, N, K]) through TMA for a config's tiles:
    with :data:`WEIGHTS_TMA` on, from :data:`WEIGHTS_TMA_MIN_BLOCK_M` rows, on NVIDIA GPUs of
    compute capability 9 or more (and Triton's interpreter), for contiguous weights whose rows
    are whole 16-byte units and tiles TMA can copy (at most 256 per side, K at least 16 bytes)."""
    if not WEIGHTS_TMA or block_m < WEIGHTS_TMA_MIN_BLOCK_M:
        return False
    return _tma_ok(b, block_n, block_k)


def sorted_input_tma(a: torch.Tensor, block_m: int, block_k: int) -> bool:
    """Whether the kernel loads a sorted input ``a`` ([EM, K], the kernel's A_SORTED) through
    TMA: with :data:`SORTED_TMA` on, where :func:`weights_tma`'s conditions hold for it."""
    if not SORTED_TMA or block_m < WEIGHTS_TMA_MIN_BLOCK_M:
        return False
    return _tma_ok(a, block_m, block_k)


def tma_here(device: torch.device) -> bool:
    """Whether kernels for ``device`` can load tiles through TMA at all: Triton has tensor
    descriptors, and the kernels are built for an NVIDIA GPU of compute capability 9 or more (in
    compile processes, such a target), or run in Triton's interpreter on CPU tensors."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return _nvidia_sm90(device)


def sorted_rows_tma(device: torch.device, block_m: int, row_bytes: tuple[int, ...]) -> bool:
    """Whether sorted rows of ``row_bytes`` bytes each would load through TMA in tiles of
    ``block_m`` rows on ``device``: :func:`sorted_input_tma`'s conditions, known before the
    rows exist (the buffers the op allocates are contiguous and 16-byte aligned)."""
    if not SORTED_TMA or block_m < WEIGHTS_TMA_MIN_BLOCK_M or block_m > 256:
        return False
    return all(n % 16 == 0 for n in row_bytes) and tma_here(device)


def _tma_ok(t: torch.Tensor, block_rows: int, block_k: int) -> bool:
    """Whether TMA can copy ``[block_rows, block_k]`` tiles of ``t``'s last dimension's rows."""
    if block_rows > 256 or block_k > 256 or not tma_here(t.device):
        return False
    size = t.element_size()
    return (
        t.is_contiguous()
        and (t.shape[-1] * size) % 16 == 0
        and t.data_ptr() % 16 == 0
        and block_k * size >= 16
    )


def block_scale_per_tile(
    block_shape: tuple[int, int] | None, activation: int, b_tma: bool, N: int, block_n: int
) -> bool:
    """Whether every column of a tile (of each half tile, for silu under TMA) falls in one
    N-group of block-quantized weight scales, so the kernel loads one scale per K step. With
    :data:`BLOCK_SCALE_PER_TILE` on, for tiles that divide the group (so they never straddle
    two): the plain GEMM's and swigluoai's tiles are contiguous rows of B; silu's halves under
    TMA are two contiguous runs, the up run starting ``N / 2`` rows on, so that offset must be
    whole groups too. silu's stacked-halves or pairs tile on pointer loads spans two groups."""
    if not BLOCK_SCALE_PER_TILE or block_shape is None:
        return False
    group_n = block_shape[0]
    if activation == ACTIVATION_CODES["silu"]:
        return b_tma and group_n % (block_n // 2) == 0 and (N // 2) % group_n == 0
    return group_n % block_n == 0


def _nvidia_sm90(device: torch.device) -> bool:
    """Whether kernels for ``device`` are built for an NVIDIA GPU of compute capability 9 or
    more: the GPU itself, or in compile processes (CPU tensors) the target Triton was told
    (moetune.precompile.pin_target) or asks the GPU for."""
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    if _compile_only:
        target = _compile_target()
        return target.backend == "cuda" and int(target.arch) >= 90
    return False


def late_trigger(direct: bool, programs: int, down: bool) -> bool:
    """Whether a GEMM launch of ``programs`` programs signals its dependents after its K loop
    (:data:`PDL_TRIGGER`); ``down``: it is GEMM2 (whose dependent is the small sum kernel)."""
    if PDL_TRIGGER not in ("early", "late", "auto"):
        raise ValueError(f"PDL_TRIGGER must be early, late or auto, got {PDL_TRIGGER!r}")
    if PDL_TRIGGER == "auto":
        return direct and not down and programs >= PDL_LATE_MIN_PROGRAMS
    return PDL_TRIGGER == "late"


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents (:data:`PDL`): NVIDIA
    GPUs of compute capability 9 or more; in compile processes (CPU tensors), such a target."""
    if not PDL or not _HAS_PDL or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _nvidia_sm90(device)


def signal_gemm1(device: torch.device) -> bool:
    """Whether the op's kernels that may run right before GEMM1 (the routing and quantization
    launches) let their dependents launch first thing (:data:`PDL_GEMM1`)."""
    return PDL_GEMM1 and use_pdl(device)


def _compile_target() -> Any:
    from triton.runtime import driver

    return driver.active.get_current_target()


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    if t is None:
        return (0,) * ndim
    return tuple(t.stride()) + (0,) * (ndim - t.dim())


def invoke_moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    routing: RoutingBlocks | DirectSlots,
    *,
    config: dict[str, Any],
    top_k: int,
    compute_dtype: torch.dtype,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    quant: str | None = None,
    per_channel: bool = False,
    block_shape: tuple[int, int] | None = None,
    activation: str | None = None,
    out_scale: torch.Tensor | None = None,
    sum_topk: int = 0,
    dependent: bool = False,
    down: bool = False,
    sorted_in: bool = False,
    sorted_out: bool = False,
    num_slots: int | None = None,
) -> None:
    """``c[slot] = epilogue(a[slot // top_k] · b[expert(slot)]ᵀ)`` for every routed slot (with
    ``sorted_in``, ``a``'s row is the slot's sorted position; with ``sorted_out``, ``c``'s).

    ``c`` is ``[num_slots, N]``; ``topk_weights`` (flattened ``[num_slots]``) is applied only when
    given. With ``activation`` (the up projection, ``b`` of ``N = 2·n`` rows) ``c`` is
    ``[num_slots, n]`` and receives the activation of the GEMM's output, quantized to ``c``'s fp8
    dtype with the static ``out_scale`` (``[1]``, or ``[num_slots, 1]`` contiguous) when ``c`` is
    fp8. With ``sum_topk = k`` (no activation) ``c`` is fp32 ``[num_slots / k, N]``, zeroed by
    the caller, and each slot's cast output is added atomically to row ``slot // k``.
    ``routing`` is the expert-sorted blocks, or :class:`moetune.align.DirectSlots` (one block a
    slot, no routing launch). ``dependent``: the kernel launched before this one is the op's
    own, so with :data:`PDL` this launch may start before it finishes; ``down``: this is the op's
    GEMM2 (:func:`late_trigger`). ``sorted_in``: ``a``'s rows are the routing's sorted positions
    (``[EM, K]``, ``num_slots`` given), not token rows; ``sorted_out``: ``c``'s rows are too
    (``[EM, ...]``; padded rows are left as they were). The caller has validated shapes; this
    checks the config and launches.
    """
    validate_config(config, block_shape)
    direct = isinstance(routing, DirectSlots)
    if (sorted_in or sorted_out) and direct:
        raise ValueError("sorted rows need the routing's blocks, not direct slots")
    if sorted_out and sum_topk:
        raise ValueError("sorted output rows and a sum over top-k exclude each other")
    if sorted_in != (num_slots is not None):
        raise ValueError("num_slots is given exactly when the input rows are sorted")
    if not sorted_in:
        num_slots = a.shape[0] * top_k  # not c's rows: with sum_topk c has one per token
    N, K = b.shape[1], b.shape[2]
    act = ACTIVATION_CODES[activation] if activation is not None else 0
    quant_out = c.dtype in FP8_DTYPES
    if sum_topk < 0 or (sum_topk and (act or num_slots % sum_topk)):
        raise ValueError(f"sum_topk {sum_topk} needs no activation and slots ({num_slots}) in "
                         "whole tokens")  # fmt: skip
    rows = num_slots // sum_topk if sum_topk else num_slots
    if sorted_in or sorted_out:
        em = routing.sorted_token_ids.numel()
        if sorted_in and a.shape[0] != em:
            raise ValueError(f"sorted input must have the routing's {em} rows, got {a.shape[0]}")
        if sorted_in and a_scale is not None and a_scale.dim() == 2 and a_scale.shape[0] != em:
            raise ValueError(f"a sorted input's per-row scales must have {em} rows too, got "
                             f"{a_scale.shape[0]}")  # fmt: skip
        if sorted_out:
            rows = em
    if c.shape[0] != rows or (sum_topk and (c.dtype != torch.float32 or c.shape[1] != N)):
        want = f"fp32 [{rows}, {N}]" if sum_topk else f"[{rows}, ...]"
        raise ValueError(f"c must be {want}, got {c.dtype} {list(c.shape)}")
    if act and (N % 2 or c.shape[1] != N // 2):
        raise ValueError(f"a fused activation needs an even N and [slots, N/2] out, got N={N}, "
                         f"out {list(c.shape)}")  # fmt: skip
    if quant_out != (out_scale is not None) or (quant_out and not act):
        raise ValueError("an fp8 output needs a fused activation and its static scale")
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    if direct:
        if routing.topk_ids.numel() != num_slots:
            raise ValueError(f"direct slots need {num_slots} routing ids, got "
                             f"{routing.topk_ids.numel()}")  # fmt: skip
        EM = num_slots * bm  # one block a slot
        sorted_ids = expert_ids = used = routing.topk_ids
    else:
        EM = routing.sorted_token_ids.numel()
        sorted_ids, expert_ids, used = routing
    grid = (triton.cdiv(EM, bm) * triton.cdiv(N, bn),)
    group_n, group_k = block_shape if block_shape is not None else (0, 0)

    a_s_strides = (0, 0)
    if a_scale is not None and a_scale.dim() == 2:
        a_s_strides = a_scale.stride()
    launch: dict[str, Any] = {k: config[k] for k in LAUNCH_KEYS if k in config}
    pdl = use_pdl(b.device)
    if pdl and dependent:
        launch["launch_pdl"] = True
    if torch.version.hip is not None:
        launch.update({k: config[k] for k in ROCM_KEYS if k in config})

    dummy = c
    b_tma = weights_tma(b, bm, bn, config["BLOCK_SIZE_K"])
    b_desc = None
    if b_tma:
        tile_n = bn // 2 if act == ACTIVATION_CODES["silu"] else bn
        b_desc = TensorDescriptor.from_tensor(
            b.view(b.shape[0] * N, K), block_shape=[tile_n, config["BLOCK_SIZE_K"]]
        )
    a_tma = sorted_in and sorted_input_tma(a, bm, config["BLOCK_SIZE_K"])
    a_desc = None
    if a_tma:
        a_desc = TensorDescriptor.from_tensor(a, block_shape=[bm, config["BLOCK_SIZE_K"]])
    if _compile_only:

        def run(*args: Any, **kwargs: Any) -> Any:
            return fused_moe_kernel.warmup(*args, grid=grid, **kwargs)

    else:
        run = fused_moe_kernel[grid]

    run(
        a,
        b,
        b_desc,
        a_desc,
        c,
        bias if bias is not None else dummy,
        a_scale if a_scale is not None else dummy,
        b_scale if b_scale is not None else dummy,
        topk_weights if topk_weights is not None else dummy,
        sorted_ids,
        expert_ids,
        used,
        out_scale if out_scale is not None else dummy,
        SWIGLU_ALPHA,
        SWIGLU_LIMIT,
        quant_max(c.dtype) if quant_out else 0.0,
        N,
        K,
        EM,
        num_slots,
        int(direct),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        *a_s_strides,
        *_strides(b_scale, 3),
        *_strides(bias, 2),
        group_n=group_n,
        group_k=group_k,
        BLOCK_SIZE_M=bm,
        BLOCK_SIZE_N=bn,
        BLOCK_SIZE_K=config["BLOCK_SIZE_K"],
        GROUP_SIZE_M=config["GROUP_SIZE_M"],
        top_k=top_k,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        HAS_BIAS=bias is not None,
        use_fp8_w8a8=quant == "fp8_w8a8",
        use_int8_w8a8=quant == "int8_w8a8",
        use_int8_w8a16=quant == "int8_w8a16",
        per_channel_quant=per_channel,
        compute_type=_TL_DTYPES[compute_dtype],
        DOT_PRECISION="ieee" if compute_dtype == torch.float32 else "tf32",
        FP8_MAX_IMPRECISE_ACC=(
            fp8_max_imprecise_acc(bm, config["BLOCK_SIZE_K"]) if quant == "fp8_w8a8" else 0
        ),
        ACTIVATION=act,
        SILU_PAIRS=(SILU_PAIRS or b_tma) and act == ACTIVATION_CODES["silu"],
        QUANT_OUT=quant_out,
        PER_ROW_SCALE=out_scale is not None and out_scale.numel() > 1,
        MIN_EXP=fp8_min_exp(c.dtype) if quant_out else -6,
        SUM_TOPK=sum_topk,
        B_TMA=b_tma,
        A_SORTED=sorted_in,
        A_TMA=a_tma,
        C_SORTED=sorted_out,
        USE_PDL=pdl,
        PDL_LATE_TRIGGER=late_trigger(direct, grid[0], down) and pdl,  # checks the switch
        B_SCALE_PER_TILE=block_scale_per_tile(block_shape, act, b_tma, N, bn),
        **launch,
    )
