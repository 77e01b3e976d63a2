"""The MoE layer as a user writes it without a fused kernel: a PyTorch loop over experts.

``moetune bench`` times it as the baseline the fused op has to beat. It is a speed baseline, not
a numerics one: the reference of :mod:`moetune.reference` is the one the op is checked against.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.activation import apply_activation_torch
from moetune.quant import dequantize_weight


def dequantized_for_naive(
    args: tuple[torch.Tensor, ...], kwargs: dict[str, Any]
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The same inputs with the weights dequantized to the compute dtype and ``quant`` dropped.

    One expert at a time, so the float64 intermediate never exceeds one expert's weights.
    """
    if kwargs.get("quant") is None:
        return args, kwargs
    x, w1, w2, tw, ti = args
    bs = tuple(kwargs["block_shape"]) if kwargs.get("block_shape") else None

    def deq(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = torch.empty(w.shape, dtype=x.dtype, device=w.device)
        for e in range(w.shape[0]):
            out[e] = dequantize_weight(w[e], s[e], bs).to(x.dtype)
        return out

    w1d, w2d = deq(w1, kwargs["w1_scale"]), deq(w2, kwargs["w2_scale"])
    kw = {**kwargs, "quant": None, "w1_scale": None, "w2_scale": None, "block_shape": None,
          "per_channel_quant": False, "a1_scale": None, "a2_scale": None}  # fmt: skip
    return (x, w1d, w2d, tw, ti), kw


def naive_moe(args: tuple[torch.Tensor, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A plain PyTorch MoE: for each expert, gather its tokens, two GEMMs, scatter-add.

    What a user writes without a fused kernel (Hugging Face's Mixtral block): GEMMs in the compute
    dtype, the routed product added into a compute-dtype output. ``nonzero`` syncs with the host
    once per expert, so it cannot be captured in a CUDA graph. A speed baseline, not a numerics
    one: quantized weights are dequantized to the compute dtype (call :func:`dequantized_for_naive`
    once beforehand to keep that out of a timing) and activations are not quantized.
    """
    if kwargs.get("expert_map") is not None:
        raise ValueError("naive_moe does not take an expert_map")
    (x, w1, w2, topk_weights, topk_ids), kw = dequantized_for_naive(args, kwargs)
    b1, b2 = kw.get("w1_bias"), kw.get("w2_bias")
    activation = kw.get("activation") or "silu"
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token] @ w1[e].T
        if b1 is not None:
            h = h + b1[e]
        y = apply_activation_torch(h, activation) @ w2[e].T
        if b2 is not None:
            y = y + b2[e]
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(x.dtype))
    return out
