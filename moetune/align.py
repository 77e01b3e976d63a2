"""Routing metadata: group the routed (token, slot) pairs by expert in blocks of BLOCK_SIZE_M.

The equivalent of vLLM's ``moe_align_block_size``, built from device-side PyTorch ops only (no
``.item()``, ``nonzero`` or host round trip), so the op can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingBlocks(NamedTuple):
    sorted_token_ids: torch.Tensor  # [max_padded] int32, slot ids by expert; padding = num_slots
    expert_ids: torch.Tensor  # [max_padded // block_m] int32, -1 = not on this rank / unused
    num_tokens_post_padded: torch.Tensor  # [1] int32, used length of sorted_token_ids


class LiveRows(NamedTuple):
    """The rows of a tensor laid out at a routing's sorted positions that hold a slot: position
    ``i`` is live when ``i < num_tokens_post_padded`` and ``sorted_token_ids[i] < num_slots``.
    Kernels between the GEMMs skip the others (padding, and the bound's unused tail)."""

    sorted_token_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    num_slots: int

    def mask(self) -> torch.Tensor:
        """``[EM]`` bool: which positions are live (PyTorch ops, no host sync)."""
        ids = self.sorted_token_ids
        positions = torch.arange(ids.numel(), device=ids.device)
        return (positions < self.num_tokens_post_padded) & (ids < self.num_slots)


class DirectSlots(NamedTuple):
    """Routing without blocks: each GEMM program's M-block holds one slot (row 0) and takes
    that slot's expert from ``topk_ids`` (flat ``[M·topk]`` int32). Needs no launch. At M=1
    (top-k distinct experts) these are the blocks the sorted routing makes, in slot order;
    where slots share an expert, each of their blocks reads its weights."""

    topk_ids: torch.Tensor


def direct_slots(topk_ids: torch.Tensor) -> DirectSlots:
    """:class:`DirectSlots` of ``topk_ids [M, topk]``: a view where they are contiguous int32
    (the router's ids, vLLM's too). Other integer ids are cast to int32, one small launch, so
    the GEMMs run the kernel the routed path compiled, not a variant for 64-bit pointers."""
    return DirectSlots(topk_ids.reshape(-1).to(torch.int32))


# Bound the padding by the experts that can hold a slot, min(slots, experts), instead of every
# expert: at decode most experts hold none, and every block of the bound is a program of both
# GEMMs' grids (Qwen3-30B-A3B at M=1: 8 blocks of 16 instead of 121). A switch for the
# measurement (results/kernels/NOTES.md §18).
TIGHT_BOUND = True


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded length: each expert that holds a slot wastes fewer
    than block_m slots, and at most ``min(num_slots, num_experts)`` experts hold one. At least
    one block."""
    holders = min(num_slots, num_experts) if TIGHT_BOUND else num_experts
    bound = num_slots + holders * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)


def moe_align_block_size_torch(
    topk_ids: torch.Tensor,
    block_m: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> RoutingBlocks:
    """Sort the flattened ``topk_ids [M, topk]`` slots by expert, padding each expert to block_m.

    ``num_experts`` is the global expert count (ids are global). With ``expert_map``
    (``[num_experts]`` int, global → local id or -1), blocks of experts that live on another rank
    get expert id -1 and the kernel writes zeros for their slots.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_slots = flat.numel()
    max_padded = max_padded_slots(num_slots, num_experts, block_m)
    num_blocks = max_padded // block_m

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_counts, 0)
    padded_start = padded_end - padded_counts
    count_start = torch.cumsum(counts, 0) - counts

    # A stable sort keeps slots of one expert in token order (better locality for A rows).
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_slots, device=device) - count_start[sorted_experts]
    position = padded_start[sorted_experts] + rank_in_expert

    sorted_token_ids = torch.full((max_padded,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, position, order.to(torch.int32))

    block_start = torch.arange(num_blocks, device=device) * block_m
    expert_of_block = torch.searchsorted(padded_end, block_start, right=True)
    total = padded_end[-1:]
    used = block_start < total
    expert_of_block = expert_of_block.clamp(max=num_experts - 1)
    if expert_map is not None:
        expert_of_block = expert_map.to(device=device, dtype=torch.int64)[expert_of_block]
    expert_ids = torch.where(used, expert_of_block, torch.full_like(expert_of_block, -1))
    return RoutingBlocks(sorted_token_ids, expert_ids.to(torch.int32), total.to(torch.int32))
