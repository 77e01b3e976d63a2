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

from moetune.problem import ACTIVATIONS

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
MAX_BLOCK = 1024


@triton.jit
def _activation_kernel(
    x_ptr, out_ptr, N, stride_x, stride_out, alpha, limit,
    SWIGLU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x_row = x_ptr + row * stride_x
    if SWIGLU:  # gate and up interleaved
        gate = tl.load(x_row + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
        up = tl.clamp(up, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
        out = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    else:  # gate | up halves
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + N + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def apply_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``[T, 2N] → [T, N]`` in fp32, cast back to the input dtype once."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    T, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or n == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(n))
    _activation_kernel[(T, triton.cdiv(n, block))](
        gate_up, out, n, gate_up.stride(0), out.stride(0), SWIGLU_ALPHA, SWIGLU_LIMIT,
        SWIGLU=activation == "swigluoai", BLOCK=block,
    )  # fmt: skip
    return out


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
