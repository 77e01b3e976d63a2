"""The activation between the GEMMs, ``[T, 2N] → [T, N]``, in one Triton launch.

In PyTorch it is 4 launches for silu-and-mul (upcast, silu, mul, cast) and ~8 for gpt-oss's
clamped swiglu; at decode batch sizes each launch costs about as much as the math. The kernel
computes in fp32 and casts once, as the PyTorch version does, and propagates NaN through the
clamps (an unwritten, NaN-poisoned row must stay visible to the check).
"""

from __future__ import annotations

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
    x_ptr, out_ptr, N, stride_x, stride_out, alpha, limit, scale_ptr, qmax,
    SWIGLU: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
    MIN_EXP: tl.constexpr, ids_ptr=None, used_ptr=None, num_slots=0, LIVE: tl.constexpr = False,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    if LIVE:  # only rows that hold a slot (moetune.align.LiveRows); the others stay as they are
        if row >= tl.load(used_ptr):
            return
        if tl.load(ids_ptr + row) >= num_slots:
            return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x_row = x_ptr + row * stride_x
    if SWIGLU:  # gate and up interleaved
        gate = tl.load(x_row + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        out = swiglu_oai(gate, up, alpha, limit)
    else:  # gate | up halves
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + N + cols, mask=mask, other=0.0).to(tl.float32)
        out = silu_mul(gate, up)
    if QUANT:  # the activation as the op's dtype holds it, then the static-scale fp8 step
        if PER_ROW_SCALE:  # noqa: SIM108 (one branch compiled)
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        h = out.to(x_ptr.dtype.element_ty).to(tl.float32)  # as the unfused op stores it
        out = quantize_fp8(h, scale, qmax, MIN_EXP)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def apply_activation(
    gate_up: torch.Tensor, activation: str, live: LiveRows | None = None
) -> torch.Tensor:
    """``[T, 2N] → [T, N]`` in fp32, cast back to the input dtype once. ``live``: only the rows
    that hold a slot of a sorted layout; the others are left unwritten."""
    gate_up, T, n = _prepare(gate_up, activation)
    out = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or n == 0:
        return out
    _launch(gate_up, out, activation, live=live)
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


def _launch(gate_up, out, activation, scale=None, qmax=0.0, min_exp=-6, live=None) -> None:
    T, n = out.shape
    block = min(MAX_BLOCK, triton.next_power_of_2(n))
    _activation_kernel[(T, triton.cdiv(n, block))](
        gate_up, out, n, gate_up.stride(0), out.stride(0), SWIGLU_ALPHA, SWIGLU_LIMIT,
        scale if scale is not None else gate_up, qmax,
        SWIGLU=activation == "swigluoai", BLOCK=block, QUANT=scale is not None,
        PER_ROW_SCALE=scale is not None and scale.dim() == 2, MIN_EXP=min_exp,
        **live_args(live),
    )  # fmt: skip


def apply_activation_quantized(
    gate_up: torch.Tensor,
    activation: str,
    qdtype: torch.dtype,
    scale: torch.Tensor,
    live: LiveRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and its static-scale fp8 quantization in one launch: the same bits as
    :func:`apply_activation` followed by ``quantize_activation(h, qdtype, scale=scale)`` (the
    activation is rounded to the input dtype before it is divided by the scale), without
    writing and reading the activation in between. Returns ``(q, scale as [1] or [T, 1])``.
    ``live``: as in :func:`apply_activation`."""
    if qdtype not in FP8_DTYPES:
        raise ValueError(f"fused quantization is fp8 only, got {qdtype}")
    gate_up, T, n = _prepare(gate_up, activation)
    scale = static_scale(scale, T).contiguous()  # the kernel reads it at unit stride
    q = torch.empty((T, n), dtype=qdtype, device=gate_up.device)
    if T == 0 or n == 0:
        return q, scale
    _launch(gate_up, q, activation, scale, quant_max(qdtype), fp8_min_exp(qdtype), live)
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
