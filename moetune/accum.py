"""fp8 accumulation on Hopper: which mode MOETUNE_FP8_ACCUM names, and what the kernel gets."""

from __future__ import annotations

import os

# Hopper's fp8 wgmma accumulates in reduced precision unless the compiler adds partial sums into
# an fp32 accumulator every ``max_num_imprecise_acc`` products; Triton's sm90 default never does.
# MOETUNE_FP8_ACCUM picks the mode: "precise" (promote after every instruction), "tile" (after
# every BLOCK_SIZE_K products, as DeepSeek-V3 promotes every 128), "fast" (never: what vLLM's
# kernel does) or "auto" (the default: tile for BLOCK_SIZE_M <= 64, where promoting cost 0-2% on
# an H100, fast for taller tiles, where it cost 8-65% through register pressure). Every mode
# passes the check by 10x (it follows the op's re-quantization). Measurements on an H100 are in
# results/fp8-accum/.
FP8_ACCUM_ENV = "MOETUNE_FP8_ACCUM"
FP8_ACCUM_MODES = ("auto", "precise", "tile", "fast")
FP8_ACCUM_DEFAULT = "auto"
AUTO_TILE_MAX_BLOCK_M = 64


def fp8_accum_mode() -> str:
    """The fp8 accumulation mode named by MOETUNE_FP8_ACCUM (default ``auto``)."""
    mode = os.environ.get(FP8_ACCUM_ENV) or FP8_ACCUM_DEFAULT  # set but empty: the default
    if mode not in FP8_ACCUM_MODES:
        raise ValueError(
            f"{FP8_ACCUM_ENV} must be one of {', '.join(FP8_ACCUM_MODES)}, got {mode!r}"
        )
    return mode


def fp8_max_imprecise_acc(block_m: int, block_k: int) -> int | None:
    """The kernel's ``max_num_imprecise_acc`` for an fp8 dot: 0 promotes after every instruction,
    ``block_k`` once per K tile, None never (Hopper's fast accumulation)."""
    mode = fp8_accum_mode()
    if mode == "auto":
        mode = "tile" if block_m <= AUTO_TILE_MAX_BLOCK_M else "fast"
    return {"precise": 0, "tile": block_k, "fast": None}[mode]
