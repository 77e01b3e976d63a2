"""The heuristic config used when no tuned table covers a problem.

The rule follows how the work per expert grows with the batch: ``M·topk/E`` routed rows per
expert on average. Few rows per expert (decode) is bound by reading weights, so a short M tile
wastes the least padding and wide K tiles keep loads long; many rows per expert (prefill) is
bound by the tensor cores, so square 64–128 tiles with grouped ordering reuse B from L2.
"""

from __future__ import annotations

from typing import Any

import torch


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 16
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def default_config(
    M: int,
    E: int,
    N: int,
    K: int,
    topk: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quant: str | None = None,
    block_shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A vLLM-style config entry for batch size ``M``; valid for every problem the op accepts."""
    rows_per_expert = M * topk / E
    if rows_per_expert <= 16:
        cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}
    elif rows_per_expert <= 64:
        cfg = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8}
    elif rows_per_expert <= 256:
        cfg = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8}
    else:
        cfg = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16}
    cfg["num_warps"] = 8 if cfg["BLOCK_SIZE_M"] * cfg["BLOCK_SIZE_N"] >= 128 * 128 else 4
    cfg["num_stages"] = 3
    if dtype == torch.float32:
        # fp32 operands take twice the shared memory per stage; halve the K tile.
        cfg["BLOCK_SIZE_K"] = 32
    if block_shape is not None:
        # One weight scale per K step: the K tile must divide the scale group.
        cfg["BLOCK_SIZE_K"] = _largest_pow2_divisor(block_shape[1], 128)
    return cfg
