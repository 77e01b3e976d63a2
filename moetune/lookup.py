"""Runtime config lookup (placeholder until tables land): the heuristic default."""

from __future__ import annotations

from typing import Any

import torch

from moetune.defaults import default_config


def config_for(
    M: int,
    E: int,
    N: int,
    K: int,
    topk: int,
    *,
    dtype: torch.dtype,
    quant: str | None,
    block_shape: tuple[int, int] | None,
) -> dict[str, Any]:
    return default_config(M, E, N, K, topk, dtype=dtype, quant=quant, block_shape=block_shape)
