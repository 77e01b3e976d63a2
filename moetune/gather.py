"""The input's rows in the routing's sorted order, for a GEMM that reads contiguous blocks.

``gather_sorted(x, routing, top_k, num_slots)`` is ``[EM, K]``: row ``i`` holds
``x[sorted_token_ids[i] // top_k]`` and padded positions hold zeros, up to the used length (rows
past it may be left unwritten: the GEMM's programs there return at once). A per-row tensor
beside the input (per-token or block scales) is gathered the same way, so the kernel (its
``A_SORTED``) indexes both by sorted position.
"""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split

import torch
import triton
import triton.language as tl

from moetune.align import LiveRows, RoutingBlocks

BLOCK_ROWS = 16


@triton.jit(do_not_specialize=["EM", "num_slots"])
def _gather_rows_kernel(
    src_ptr,
    dst_ptr,
    sorted_ids_ptr,
    used_ptr,
    EM,
    num_slots,
    K,
    stride_src,
    stride_dst,
    top_k: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGNAL: tl.constexpr = False,
):
    if SIGNAL:  # the op's next kernel (a programmatic dependent) may launch now
        tl.extra.cuda.gdc_launch_dependents()
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_r * BLOCK_ROWS >= tl.load(used_ptr):
        return
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    in_em = rows < EM
    ids = tl.load(sorted_ids_ptr + rows, mask=in_em, other=num_slots).to(tl.int64)
    valid = ids < num_slots
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    in_k = cols < K
    x = tl.load(
        src_ptr + (ids // top_k)[:, None] * stride_src + cols[None, :],
        mask=valid[:, None] & in_k[None, :],
        other=0.0,
    )
    tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], x, mask=in_em[:, None] & in_k)


def gather_sorted(
    x: torch.Tensor, routing: RoutingBlocks, top_k: int, num_slots: int, signal: bool = False
) -> torch.Tensor:
    """``x [T, K]``'s rows at the routing's sorted positions (``[EM, K]``, see the module).
    ``signal``: the kernel lets a programmatic dependent (GEMM1) launch first thing."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, K] with contiguous rows, got {list(x.shape)}")
    if x.shape[0] * top_k != num_slots:
        raise ValueError(f"{x.shape[0]} rows of top-{top_k} make {x.shape[0] * top_k} slots, "
                         f"not {num_slots}")  # fmt: skip
    sorted_ids, _, used = routing
    em = sorted_ids.numel()
    out = torch.empty((em, x.shape[1]), dtype=x.dtype, device=x.device)
    K = x.shape[1]
    block_k = min(triton.next_power_of_2(K), max(16, 1024 // x.element_size()))
    grid = (triton.cdiv(em, BLOCK_ROWS), triton.cdiv(K, block_k))
    _gather_rows_kernel[grid](
        x, out, sorted_ids, used, em, num_slots, K, x.stride(0), out.stride(0),
        top_k=top_k, BLOCK_ROWS=BLOCK_ROWS, BLOCK_K=block_k, SIGNAL=signal,
    )  # fmt: skip
    return out


def gather_sorted_torch(
    x: torch.Tensor, routing: RoutingBlocks, top_k: int, num_slots: int
) -> torch.Tensor:
    """:func:`gather_sorted` in PyTorch (compile processes; the tests' reference): every row
    past the used length is zero too."""
    ids = routing.sorted_token_ids.to(torch.int64)
    valid = LiveRows(ids, routing.num_tokens_post_padded, num_slots).mask()
    rows = torch.where(valid, ids // top_k, 0)
    out = x[rows]
    bits = out.view(torch.uint8) if out.element_size() == 1 else out  # fp8: zero is all-0 bits
    bits[~valid] = 0
    return out
