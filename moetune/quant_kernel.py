"""fp8 activation quantization in Triton: 1–3 launches instead of ~9 PyTorch ones.

At decode batch sizes the fp8 op spent more time quantizing its two activations (upcast, abs,
amax, clamp, divide, divide, clamp, cast for each) than in its GEMMs. Same arithmetic as
:func:`moetune.quant.quantize_activation`, which the reference keeps using: amax in fp32, scale =
max(amax, 1e-12) / qmax, ``x / scale`` rounded to nearest (``div_rn``, as PyTorch divides), clamp
to ±qmax, round-to-nearest-even cast. So op and reference see the same quantized operands.

- static scale (``[1]`` or ``[T, 1]``): one launch;
- dynamic per token, or per token and group of ``group_k`` columns: one launch (a program per row
  or per (row, group) finds its amax, then quantizes);
- dynamic per tensor: a memset, an amax launch (atomic max of each program's amax), and the
  quantizing launch.
int8 stays on the PyTorch path (its round-half-even has no interpreter-portable Triton spelling).
"""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split
from typing import Any

import torch
import triton
import triton.language as tl

from moetune.align import LiveRows
from moetune.quant import _MIN_AMAX, FP8_DTYPES, quant_max, quantize_activation, static_scale

COLS = 1024  # columns per program for the per-tensor kernels and per-row loops


@triton.jit
def _round_to_fp8(y, MIN_EXP: tl.constexpr):
    """``y`` (fp32, already clamped to ±qmax) rounded to the nearest e4m3 value, ties to even,
    in fp32 arithmetic, so the cast that follows is exact. Triton's interpreter rounds fp32 →
    fp8 wrongly when rounding up crosses a power of two (126.5 → 64); this keeps the CPU tests
    and the GPU on the same numbers. MIN_EXP: the smallest normal exponent (-6 for e4m3fn, -7
    for e4m3fnuz); below it the grid is the subnormal one."""
    bits = y.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
    quantum = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    big = quantum * 12582912.0  # 1.5 * 2**23 quanta: |y| + big lands where the ulp is one quantum
    rounded = (tl.abs(y) + big) - big
    # The sign goes back by bit, so a negative value that rounds to zero stays -0 as in PyTorch.
    sign = bits & -2147483648
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def fp8_min_exp(qdtype: torch.dtype) -> int:
    """The smallest normal exponent of an e4m3 dialect, for :func:`_round_to_fp8`."""
    return -6 if qdtype == torch.float8_e4m3fn else -7


@triton.jit
def _clamp_nan(y, qmax):
    """``y`` clamped to ±qmax with NaN kept: an unwritten (NaN-poisoned) row must reach the
    check as NaN, as PyTorch's clamp keeps it, not as ±qmax (min/max drop NaN on GPUs)."""
    return tl.clamp(y, -qmax, qmax, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_fp8(x, scale, qmax, MIN_EXP: tl.constexpr):
    """``x / scale`` (fp32, correctly rounded as PyTorch divides) clamped to ±qmax with NaN kept,
    on the e4m3 grid: the quantization step every fp8 kernel here shares, so their bits agree
    with each other and with :func:`moetune.quant.quantize_activation`."""
    return _round_to_fp8(_clamp_nan(tl.div_rn(x, scale), qmax), MIN_EXP)


@triton.jit
def _scale_from_amax(amax, has_nan, min_amax, qmax):
    """``max(amax, min_amax) / qmax``, NaN when the values held a NaN: PyTorch's amax returns
    NaN there (so the scale and every value quantized with it), while a GPU's max and atomic
    max drop NaN, so the kernels carry it beside the max."""
    amax = tl.where(has_nan, float("nan"), amax)
    return tl.div_rn(tl.maximum(amax, min_amax, propagate_nan=tl.PropagateNan.ALL), qmax)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, T, K, stride, COLS: tl.constexpr):
    """``amax_ptr[0]``: max |x| over the tensor; ``amax_ptr[1]``: 1 if any x is NaN (a GPU's max
    and atomic max drop NaN, where PyTorch's amax returns it)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < K, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x), 0))
    nans = tl.sum((x != x).to(tl.int32), 0)
    if nans > 0:
        tl.atomic_max(amax_ptr + 1, 1.0)


@triton.jit
def _quant_tensor_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr, T, K, stride_x, stride_q, qmax, min_amax,
    DYNAMIC: tl.constexpr, PER_ROW_SCALE: tl.constexpr, COLS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    SIGNAL: tl.constexpr = False,
):  # fmt: skip
    """Per-tensor (dynamic: from ``amax_ptr``; static: ``scale_ptr``) or static per-row scale."""
    if SIGNAL:  # the op's next kernel (a programmatic dependent) may launch now
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    if DYNAMIC:
        scale = _scale_from_amax(tl.load(amax_ptr), tl.load(amax_ptr + 1) > 0, min_amax, qmax)
        if (row == 0) & (col_block == 0):
            tl.store(scale_ptr, scale)
    elif PER_ROW_SCALE:
        scale = tl.load(scale_ptr + row)
    else:
        scale = tl.load(scale_ptr)
    cols = col_block * COLS + tl.arange(0, COLS)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = quantize_fp8(x, scale, qmax, MIN_EXP)
    tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _quant_group_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, stride_s, qmax, min_amax,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, MIN_EXP: tl.constexpr,
    SIGNAL: tl.constexpr = False, ids_ptr=None, used_ptr=None, num_slots=0,
    LIVE: tl.constexpr = False,
):  # fmt: skip
    """Dynamic scale per (row, group of GROUP columns); GROUP = K for per-token scales. With
    LIVE, only rows that hold a slot (moetune.align.LiveRows); the others stay as they are."""
    if SIGNAL:  # the op's next kernel (a programmatic dependent) may launch now
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    if LIVE:
        if row >= tl.load(used_ptr):
            return
        if tl.load(ids_ptr + row) >= num_slots:
            return
    g = tl.program_id(1)
    start = g * GROUP
    amax = tl.zeros((), dtype=tl.float32)
    nans = tl.zeros((), dtype=tl.int32)
    for c in range(0, GROUP, BLOCK):
        cols = start + c + tl.arange(0, BLOCK)
        mask = (cols < K) & (c + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
        nans += tl.sum((x != x).to(tl.int32), 0)
    scale = _scale_from_amax(amax, nans > 0, min_amax, qmax)
    tl.store(scale_ptr + row * stride_s + g, scale)
    for c in range(0, GROUP, BLOCK):
        cols = start + c + tl.arange(0, BLOCK)
        mask = (cols < K) & (c + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = quantize_fp8(x, scale, qmax, MIN_EXP)
        tl.store(q_ptr + row * stride_q + cols,
                 y.to(q_ptr.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _quant_group_rows_kernel(
    x_ptr, q_ptr, scale_ptr, T, K, stride_x, stride_q, stride_s, qmax, min_amax,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, MIN_EXP: tl.constexpr,
    SIGNAL: tl.constexpr = False, ids_ptr=None, used_ptr=None, num_slots=0,
    LIVE: tl.constexpr = False,
):  # fmt: skip
    """Dynamic scale per (row, group of GROUP <= BLOCK columns), for ROWS rows of one group per
    program: the ``[ROWS, BLOCK]`` tile is loaded once and kept in registers between its amax
    and its quantization (a program per row and group of 128 columns, one column per thread,
    loading it twice, was 5x off the copy's bandwidth on an H100). With LIVE, only rows that
    hold a slot (moetune.align.LiveRows); the others stay as they are."""
    if SIGNAL:  # the op's next kernel (a programmatic dependent) may launch now
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_t = rows < T
    if LIVE:
        used = tl.load(used_ptr)
        if tl.program_id(0) * ROWS >= used:
            return
        ids = tl.load(ids_ptr + rows, mask=in_t, other=num_slots)
        in_t = in_t & (rows < used) & (ids < num_slots)
    g = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    cols = g * GROUP + offs
    mask = in_t[:, None] & (cols[None, :] < K) & (offs[None, :] < GROUP)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)  # fmt: skip
    amax = tl.max(tl.abs(x), 1)
    nans = tl.sum((x != x).to(tl.int32), 1)
    scale = _scale_from_amax(amax, nans > 0, min_amax, qmax)
    tl.store(scale_ptr + rows * stride_s + g, scale, mask=in_t)
    y = quantize_fp8(x, scale[:, None], qmax, MIN_EXP)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :],
             y.to(q_ptr.dtype.element_ty), mask=mask)  # fmt: skip


# Elements one program of _quant_group_rows_kernel holds at most (ROWS = this / BLOCK rows),
# once the grid has FILL_PROGRAMS programs. On an H100 (benchmarks/quant_group_tile.py,
# results/kernels/h100-0.2.8-group-quant/) 2048 was the fastest of 1024-8192 at 512-32768 rows.
GROUP_TILE = 2048
FILL_PROGRAMS = 256
# Dynamic per-group (and per-token, for rows of at most COLS) scales through
# _quant_group_rows_kernel; off: a program per row and group (_quant_group_kernel). Same bits.
GROUP_ROWS_KERNEL = True


def quantize_activation_fast(
    x: torch.Tensor,
    qdtype: torch.dtype,
    *,
    scale: torch.Tensor | None = None,
    per_token: bool = False,
    group_k: int | None = None,
    live: LiveRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moetune.quant.quantize_activation` with Triton kernels for fp8 (same results);
    int8 and unusual inputs go to the PyTorch version. ``live`` (dynamic per-token or per-group
    scales only): only the rows of a sorted layout that hold a slot; the others, and their
    scales, are left unwritten."""
    unusual = x.dim() != 2 or x.numel() == 0 or (group_k is not None and scale is not None)
    if live is not None and group_k is None and not (per_token and scale is None):
        raise ValueError("live rows apply to dynamic per-token or per-group scales only")
    if qdtype not in FP8_DTYPES or unusual:  # the PyTorch version handles (or refuses) these
        # (on every row, live or not: the same values for the live ones)
        return quantize_activation(x, qdtype, scale=scale, per_token=per_token, group_k=group_k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, K = x.shape
    qmax = quant_max(qdtype)
    min_exp = fp8_min_exp(qdtype)
    q = torch.empty((T, K), dtype=qdtype, device=x.device)
    signal = _signal(x.device)
    if group_k is not None or (scale is None and per_token):
        group = group_k if group_k is not None else K
        n_groups = triton.cdiv(K, group)
        s = torch.empty((T, n_groups), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(group)
        if GROUP_ROWS_KERNEL and block <= COLS:  # a group fits a program's row: several rows
            # Rows a program: up to GROUP_TILE elements, but first enough programs to fill the
            # GPU. Each thread quantizes its share of the tile, masked rows too: 32-row
            # programs were ~4x slower than one row at T=1 (H100, results/kernels/NOTES.md §19).
            want = triton.cdiv(T * n_groups, FILL_PROGRAMS)
            rows = min(max(1, GROUP_TILE // block), triton.next_power_of_2(want))
            _quant_group_rows_kernel[(triton.cdiv(T, rows), n_groups)](
                x, q, s, T, K, x.stride(0), q.stride(0), s.stride(0), qmax, _MIN_AMAX,
                GROUP=group, BLOCK=block, ROWS=rows, MIN_EXP=min_exp, SIGNAL=signal,
                **live_args(live),
            )  # fmt: skip
            return q, s
        _quant_group_kernel[(T, n_groups)](
            x, q, s, K, x.stride(0), q.stride(0), s.stride(0), qmax, _MIN_AMAX,
            GROUP=group, BLOCK=min(COLS, block), MIN_EXP=min_exp, SIGNAL=signal,
            **live_args(live),
        )  # fmt: skip
        return q, s
    grid = (T, triton.cdiv(K, COLS))
    if scale is None:  # dynamic per tensor
        amax = torch.zeros(2, dtype=torch.float32, device=x.device)  # max |x|, NaN seen
        out_scale = torch.empty(1, dtype=torch.float32, device=x.device)
        _amax_kernel[grid](x, amax, T, K, x.stride(0), COLS=COLS)
        _quant_tensor_kernel[grid](
            x, q, out_scale, amax, T, K, x.stride(0), q.stride(0), qmax, _MIN_AMAX,
            DYNAMIC=True, PER_ROW_SCALE=False, COLS=COLS, MIN_EXP=min_exp, SIGNAL=signal,
        )  # fmt: skip
        return q, out_scale
    scale = static_scale(scale, T).contiguous()  # the kernel reads it at unit stride
    _quant_tensor_kernel[grid](
        x, q, scale, scale, T, K, x.stride(0), q.stride(0), qmax, _MIN_AMAX,
        DYNAMIC=False, PER_ROW_SCALE=scale.dim() == 2, COLS=COLS, MIN_EXP=min_exp,
        SIGNAL=signal,
    )  # fmt: skip
    return q, scale


def _signal(device: torch.device) -> bool:
    from moetune.launch import signal_gemm1  # imported here: launch imports this module

    return signal_gemm1(device)


def live_args(live: LiveRows | None) -> dict[str, Any]:
    """The kernels' LIVE arguments for ``live`` (none: every row)."""
    if live is None:
        return {"LIVE": False}
    return {"ids_ptr": live.sorted_token_ids, "used_ptr": live.num_tokens_post_padded,
            "num_slots": live.num_slots, "LIVE": True}  # fmt: skip
