"""The sum over top-k in Triton: ``[M·topk, K] → [M, K]``, fp32 in slot order, one cast.

The op's last step sums each token's ``topk`` slot rows of GEMM2's output. PyTorch's
``view(M, topk, K).sum(dim=1)`` reduces over a middle dimension, which its reduce kernel reads
at well under the copy bandwidth at prefill sizes (81 µs for Mixtral-8x7B's 100 MB at M=4096 on
an H100, where a copy of that size takes ~35 µs; results/kernels/NOTES.md §17). Here each
program loads a ``[BLOCK_M, BLOCK_K]`` tile of every slot (the loads are independent, so they
are all in flight at once), adds them in fp32 in slot order (0, 1, …, topk−1) and casts once,
as PyTorch's sum casts its fp32 total. NaN (an unwritten, poisoned slot row) propagates.

The addition order is fixed, so the bits are the same from run to run; they match
:func:`topk_sum_torch` (the same order, written in PyTorch) exactly.
"""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split
import torch
import triton
import triton.language as tl

from moetune.launch import use_pdl

# The tile: one row of 1,024 columns (more rows where K is narrower), 8 warps. Chosen on an H100
# from 60 tiles timed at the reference problems' 21 shapes (benchmarks/topk_sum_blocks.py,
# results/kernels/h100-0.2.6/topk_sum_blocks.json): within 3% of each shape's best tile in
# geomean; the first guess (2,048 outputs, 512 columns, 4 warps) took 2.6 µs at Qwen3-30B-A3B's
# M=8 and 32 (topk 8), where this takes 1.7.
ELEMENTS = 1024  # output elements per program
MAX_BLOCK_K = 1024
NUM_WARPS = 8


@triton.jit
def _topk_sum_kernel(
    x_ptr,
    out_ptr,
    M,
    K,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # launched as a programmatic dependent (launch.PDL)
):
    if USE_PDL:  # let the next launch start, then wait for the previous kernel's memory
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)[:, None]
    src = x_ptr + rows64 * (TOPK * K) + cols[None, :]
    acc = tl.load(src, mask=mask).to(tl.float32)
    for j in tl.static_range(1, TOPK):
        acc += tl.load(src + j * K, mask=mask).to(tl.float32)
    tl.store(out_ptr + rows64 * K + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def blocks(
    M: int, K: int, elements: int | None = None, max_block_k: int | None = None
) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)``: up to ``max_block_k`` columns, then rows up to ``elements`` output
    elements per program (no more rows than M, rounded up to a power of two)."""
    block_k = min(max_block_k or MAX_BLOCK_K, triton.next_power_of_2(K))
    block_m = min(max(1, (elements or ELEMENTS) // block_k), triton.next_power_of_2(M))
    return block_m, block_k


def topk_sum(
    x: torch.Tensor,
    topk: int,
    *,
    elements: int | None = None,
    max_block_k: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``x [M·topk, K]`` (each token's slots in consecutive rows) summed over its slots:
    ``[M, K]`` in ``x``'s dtype. The keywords override the tile (benchmarks only)."""
    if x.dim() != 2 or topk < 1 or x.shape[0] % topk:
        raise ValueError(f"x must be [M*topk, K] with topk={topk}, got shape {tuple(x.shape)}")
    x = x.contiguous()
    M, K = x.shape[0] // topk, x.shape[1]
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if M == 0 or K == 0:
        return out
    block_m, block_k = blocks(M, K, elements, max_block_k)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    pdl = {"USE_PDL": True, "launch_pdl": True} if use_pdl(x.device) else {}
    _topk_sum_kernel[grid](x, out, M, K, TOPK=topk, BLOCK_M=block_m, BLOCK_K=block_k,
                           num_warps=num_warps or NUM_WARPS, **pdl)  # fmt: skip
    return out


def topk_sum_torch(x: torch.Tensor, topk: int) -> torch.Tensor:
    """The same sum in PyTorch, in the same order (slot 0 + slot 1 + …, fp32, one cast)."""
    M, K = x.shape[0] // topk, x.shape[1]
    slots = x.view(M, topk, K)
    acc = slots[:, 0].float()
    for j in range(1, topk):
        acc = acc + slots[:, j].float()
    return acc.to(x.dtype)


__all__ = ["topk_sum", "topk_sum_torch"]
