"""The reference MoE op: plain PyTorch, every GEMM and epilogue in float64.

It starts from the same quantized operands and scales as the op (the quantization helpers are the
only code the two share) and casts where the op casts: GEMM1's output, the activation's output,
GEMM2's output and the final sum. The tests, the checker and the benchmarks import this one
reference; nothing else re-implements it.

``epilogue`` selects the order of DESIGN §1 (``"dequant-bias-route-cast"``) or one of the known
wrong orders that shipped in 2026, kept so tests can prove the checker rejects them:

- ``"bias-before-dequant"``: the bias is added to the raw accumulator, so it gets scaled too;
- ``"route-before-bias"``: the router weight multiplies before the bias (vLLM PR #31931), so the
  bias escapes the weight;
- ``"cast-before-route"``: the result is cast to the compute dtype before the router multiply,
  a second rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.quant import dequantize_activation, dequantize_weight, quantize_activation
from moetune.validate import validate_moe_args

EPILOGUES = (
    "dequant-bias-route-cast",
    "bias-before-dequant",
    "route-before-bias",
    "cast-before-route",
)
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def _activation64(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    x = gate_up.double()
    if activation == "silu":
        n = x.shape[-1] // 2
        gate, up = x[:, :n], x[:, n:]
        return gate * torch.sigmoid(gate) * up
    if activation == "swigluoai":
        gate = x[:, 0::2].clamp(max=SWIGLU_LIMIT)
        up = x[:, 1::2].clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
        return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1.0)
    raise ValueError(f"activation must be 'silu' or 'swigluoai', got {activation!r}")


def _gemm64(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    route: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    quant: str | None,
    block_shape: tuple[int, int] | None,
    epilogue: str,
) -> torch.Tensor:
    """One expert's GEMM on its rows: ``a [R, K]``, ``w [N_out, K]`` → ``[R, N_out]`` cast."""
    if block_shape is not None:
        if epilogue == "bias-before-dequant":
            raise ValueError("bias-before-dequant is undefined for block quantization")
        # Dequantizing both operands per block then multiplying equals Σ_kb (Σ a·w)·s_a·s_w.
        a64 = dequantize_activation(a, a_scale, block_shape[1])
        acc = a64 @ dequantize_weight(w, w_scale, block_shape).T
        scale: torch.Tensor | float = 1.0
    else:
        acc = a.double() @ w.double().T
        scale = 1.0
        if quant == "int8_w8a16":
            scale = w_scale.double().reshape(1, -1)
        elif quant in ("fp8_w8a8", "int8_w8a8"):
            ws = w_scale.double()
            a_s = a_scale.double()
            scale = (a_s.reshape(-1, 1) if a_s.numel() > 1 else a_s.reshape(1, 1)) * (
                ws.reshape(1, -1) if ws.numel() > 1 else ws.reshape(1, 1)
            )
    b = bias.double().reshape(1, -1) if bias is not None else 0.0
    r = route.double().reshape(-1, 1) if route is not None else None
    if epilogue == "bias-before-dequant":
        y = (acc + b) * scale
        return (y * r if r is not None else y).to(out_dtype)
    y = acc * scale
    if epilogue == "route-before-bias" and r is not None:
        return (y * r + b).to(out_dtype)
    y = y + b
    if epilogue == "cast-before-route" and r is not None:
        return (y.to(out_dtype).double() * r).to(out_dtype)
    return (y * r if r is not None else y).to(out_dtype)


def fused_experts_reference(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    quant: str | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    per_channel_quant: bool = False,
    block_shape: list[int] | tuple[int, int] | None = None,
    config: dict[str, Any] | None = None,
    expert_map: torch.Tensor | None = None,
    epilogue: str = "dequant-bias-route-cast",
) -> torch.Tensor:
    """Same signature and meaning as :func:`moetune.fused_experts` (``config`` is ignored)."""
    del config
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    args = validate_moe_args(
        hidden_states, w1, w2, topk_weights, topk_ids,
        activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        w1_scale=w1_scale, w2_scale=w2_scale, a1_scale=a1_scale, a2_scale=a2_scale,
        per_channel_quant=per_channel_quant, block_shape=block_shape, expert_map=expert_map,
    )  # fmt: skip
    block = args.block_shape
    dtype = hidden_states.dtype
    M, K = hidden_states.shape
    topk = topk_ids.shape[1]
    w8a8 = quant in ("fp8_w8a8", "int8_w8a8")
    group_k = block[1] if block is not None else None
    gemm_kw = dict(out_dtype=dtype, quant=quant, block_shape=block)

    ids = topk_ids.long()
    local = ids if expert_map is None else expert_map.to(ids.device).long()[ids]
    slot_expert = local.reshape(-1)  # [M·topk], -1 = on another rank
    slot_token = torch.arange(M, device=ids.device).repeat_interleave(topk)

    a1, a1s = hidden_states, None
    if w8a8:
        a1, a1s = quantize_activation(
            hidden_states, w1.dtype, scale=a1_scale, per_token=per_channel_quant, group_k=group_k
        )

    def rows_scale(s: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        if s is None or s.numel() == 1:
            return s
        return s[rows]

    def expert_scale(s: torch.Tensor | None, e: int) -> torch.Tensor | None:
        return None if s is None else s[e]

    n2 = w1.shape[1]
    cache1 = torch.zeros(M * topk, n2, dtype=dtype, device=hidden_states.device)
    for e in range(w1.shape[0]):
        slots = (slot_expert == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        toks = slot_token[slots]
        cache1[slots] = _gemm64(
            a1[toks], rows_scale(a1s, toks), w1[e], expert_scale(w1_scale, e),
            None if w1_bias is None else w1_bias[e], None, epilogue=epilogue, **gemm_kw,
        )  # fmt: skip
    h = _activation64(cache1, activation).to(dtype)

    a2, a2s = h, None
    if w8a8:
        a2, a2s = quantize_activation(
            h, w1.dtype, scale=a2_scale, per_token=per_channel_quant, group_k=group_k
        )
    route = topk_weights.reshape(-1).float()
    cache3 = torch.zeros(M * topk, K, dtype=dtype, device=hidden_states.device)
    for e in range(w2.shape[0]):
        slots = (slot_expert == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        cache3[slots] = _gemm64(
            a2[slots], rows_scale(a2s, slots), w2[e], expert_scale(w2_scale, e),
            None if w2_bias is None else w2_bias[e], route[slots], epilogue=epilogue, **gemm_kw,
        )  # fmt: skip
    return cache3.view(M, topk, K).double().sum(dim=1).to(dtype)
