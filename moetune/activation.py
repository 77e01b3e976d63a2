"""The activation between the GEMMs, ``[T, 2N] → [T, N]``, in one Triton launch.

In PyTorch it is 4 launches for silu-and-mul (upcast, silu, mul, cast) and ~8 for gpt-oss's
clamped swiglu; at decode batch sizes each launch costs about as much as the math. The kernel
computes in fp32 and casts once, as the PyTorch version does, and propagates NaN through the
clamps (an unwritten, NaN-poisoned row must stay visible to the check).
"""

from __future__ import annotations

from typing import NamedTuple

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split
import torch
import triton
import triton.language as tl

from moetune.align import LiveRows
from moetune.problem import ACTIVATIONS
from moetune.quant import FP8_DTYPES, quant_max, static_scale
from moetune.quant_kernel import fp8_min_exp, live_args, quantize_fp8

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
MAX_BLOCK = 1024


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) · up`` in fp32 (shared by the activation kernel and the GEMM1 epilogue, so
    both compute the same bits)."""
    return gate * tl.sigmoid(gate) * up


@triton.jit
def swiglu_oai(gate, up, alpha, limit):
    """gpt-oss's clamped swiglu in fp32, NaN kept through the clamps (shared as above)."""
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.clamp(up, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
    return gate * tl.sigmoid(alpha * gate) * (up + 1.0)


@triton.jit
def _activation_kernel(
    x_ptr, out_ptr, T, N, stride_x, stride_out, alpha, limit, scale_ptr, qmax,
    SWIGLU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr, MIN_EXP: tl.constexpr, PAIR_LOAD: tl.constexpr = False,
    ids_ptr=None, used_ptr=None, num_slots=0, LIVE: tl.constexpr = False,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    if LIVE:  # only rows that hold a slot (moetune.align.LiveRows); the others stay as they are
        row_ok &= rows < tl.load(used_ptr)
        row_ok &= tl.load(ids_ptr + rows, mask=row_ok, other=num_slots) < num_slots
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < N)[None, :]
    x_rows = x_ptr + rows[:, None] * stride_x
    if SWIGLU:  # gate and up interleaved
        if PAIR_LOAD:  # each (gate, up) pair in one load, split in registers
            pair = cols[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
            gu = tl.load(x_rows[:, :, None] + pair, mask=mask[:, :, None], other=0.0)
            gate, up = tl.split(gu.to(tl.float32))
        else:
            gate = tl.load(x_rows + 2 * cols[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(x_rows + 2 * cols[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        out = swiglu_oai(gate, up, alpha, limit)
    else:  # gate | up halves
        gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_rows + N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = silu_mul(gate, up)
    if QUANT:  # the activation as the op's dtype holds it, then the static-scale fp8 step
        if PER_ROW_SCALE:  # one branch compiled
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
        else:
            scale = tl.load(scale_ptr)
        h = out.to(x_ptr.dtype.element_ty).to(tl.float32)  # as the unfused op stores it
        out = quantize_fp8(h, scale, qmax, MIN_EXP)
    dst = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def apply_activation(
    gate_up: torch.Tensor,
    activation: str,
    live: LiveRows | None = None,
    *,
    tile: Tile | None = None,
) -> torch.Tensor:
    """``[T, 2N] → [T, N]`` in fp32, cast back to the input dtype once. ``live``: only the rows
    that hold a slot of a sorted layout; the others are left unwritten. ``tile`` overrides
    TILE (benchmarks, tests)."""
    gate_up, T, n = _prepare(gate_up, activation)
    out = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or n == 0:
        return out
    _launch(gate_up, out, activation, live=live, tile=tile)
    return out


def _prepare(gate_up: torch.Tensor, activation: str) -> tuple[torch.Tensor, int, int]:
    """The input at unit column stride, its rows T and output columns N; refuses unknown
    activations."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    T, two_n = gate_up.shape
    return gate_up, T, two_n // 2


class Tile(NamedTuple):
    """A program's ``[rows, block]`` piece of the output, and its warps."""

    rows: int
    block: int
    num_warps: int
    pair_load: bool  # swiglu: each interleaved (gate, up) pair in one load


# One row of up to MAX_BLOCK columns a program, 4 warps, swiglu's (gate, up) pairs in one load.
# Without a tile asked for, the block narrows to the width that wastes the fewest columns (ties
# to the wider): Mixtral-8x7B's 3,584 columns in 7 blocks of 512, not 4 of 1,024. On an H100
# that took its fp8 launch at M=4096 from 60.8 to 52.5 µs, and the paired load gpt-oss-120b's
# from 111.0 to 106.9 µs (results/kernels/NOTES.md §27).
TILE = Tile(1, MAX_BLOCK, 4, True)
FIT_BLOCK = True  # the default tile's block halves where that wastes fewer columns


def tile_for(T: int, n: int, tile: Tile | None = None) -> Tile:
    """``tile`` (default TILE) fitted to the shape: no wider than n's next power of two, no
    more rows than T's. Without ``tile`` (and with FIT_BLOCK), the block halves if that wastes
    fewer columns."""
    t = tile or TILE
    block = min(t.block, triton.next_power_of_2(n))
    half = block // 2
    if (tile is None and FIT_BLOCK and half >= 16
            and triton.cdiv(n, half) * half < triton.cdiv(n, block) * block):  # fmt: skip
        block = half
    return t._replace(block=block, rows=min(t.rows, triton.next_power_of_2(max(T, 1))))


def _launch(
    gate_up, out, activation, scale=None, qmax=0.0, min_exp=-6, live=None, tile=None
) -> None:
    T, n = out.shape
    t = tile_for(T, n, tile)
    _activation_kernel[(triton.cdiv(T, t.rows), triton.cdiv(n, t.block))](
        gate_up, out, T, n, gate_up.stride(0), out.stride(0), SWIGLU_ALPHA, SWIGLU_LIMIT,
        scale if scale is not None else gate_up, qmax,
        SWIGLU=activation == "swigluoai", ROWS=t.rows, BLOCK=t.block, QUANT=scale is not None,
        PER_ROW_SCALE=scale is not None and scale.dim() == 2, MIN_EXP=min_exp,
        PAIR_LOAD=t.pair_load, num_warps=t.num_warps, **live_args(live),
    )  # fmt: skip


def apply_activation_quantized(
    gate_up: torch.Tensor,
    activation: str,
    qdtype: torch.dtype,
    scale: torch.Tensor,
    live: LiveRows | None = None,
    *,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and its static-scale fp8 quantization in one launch: the same bits as
    :func:`apply_activation` followed by ``quantize_activation(h, qdtype, scale=scale)`` (the
    activation is rounded to the input dtype before it is divided by the scale), without
    writing and reading the activation in between. Returns ``(q, scale as [1] or [T, 1])``.
    ``live`` and ``tile``: as in :func:`apply_activation`."""
    if qdtype not in FP8_DTYPES:
        raise ValueError(f"fused quantization is fp8 only, got {qdtype}")
    gate_up, T, n = _prepare(gate_up, activation)
    scale = static_scale(scale, T).contiguous()  # the kernel reads it at unit stride
    q = torch.empty((T, n), dtype=qdtype, device=gate_up.device)
    if T == 0 or n == 0:
        return q, scale
    _launch(gate_up, q, activation, scale, quant_max(qdtype), fp8_min_exp(qdtype), live, tile)
    return q, scale


def apply_activation_torch(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The same in PyTorch ops (the naive baseline, and a cross-check in tests)."""
    x = gate_up.float()
    if activation == "silu":
        n = x.shape[-1] // 2
        out = torch.nn.functional.silu(x[:, :n]) * x[:, n:]
    elif activation == "swigluoai":
        gate = x[:, 0::2].clamp(max=SWIGLU_LIMIT)
        up = x[:, 1::2].clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
        out = gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1.0)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return out.to(gate_up.dtype)
