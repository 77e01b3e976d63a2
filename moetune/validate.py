"""Argument checks for the MoE op and its reference: a clear ValueError naming the argument."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.quant import FP8_DTYPES, QUANTS

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class MoeArgs:
    block_shape: tuple[int, int] | None
    global_num_experts: int


def _shape(name: str, t: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if t is None:
        raise ValueError(f"{name} is required here")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(t.shape)}")


def _scale_shape_ok(scale: torch.Tensor, options: list[tuple[int, ...]]) -> bool:
    return tuple(scale.shape) in options


def validate_moe_args(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str,
    w1_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    quant: str | None,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a1_scale: torch.Tensor | None,
    a2_scale: torch.Tensor | None,
    per_channel_quant: bool,
    block_shape: list[int] | tuple[int, int] | None,
    expert_map: torch.Tensor | None,
) -> MoeArgs:
    """Check every argument of ``fused_experts`` against DESIGN §2; return derived facts."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("hidden_states must be a 2-D tensor [M, K]")
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"hidden_states dtype must be bfloat16, float16 or float32, got {x.dtype}")
    M, K = x.shape
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3:
        raise ValueError("w1 must be a 3-D tensor [E, 2N, K]")
    E, two_n, k1 = w1.shape
    if k1 != K:
        raise ValueError(
            f"w1 must have shape [E, 2N, {K}] (K of hidden_states), got {list(w1.shape)}"
        )
    if two_n % 2:
        raise ValueError(f"w1's second dimension (2N) must be even, got {two_n}")
    N = two_n // 2
    _shape("w2", w2, (E, K, N))
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise ValueError(f"topk_ids must have shape [{M}, topk], got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    for name, t in (("w1", w1), ("w2", w2), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, hidden_states on {x.device}")
    if activation == "swigluoai" and N == 0:
        raise ValueError("swigluoai needs a non-empty intermediate size")
    if w1_bias is not None:
        _shape("w1_bias", w1_bias, (E, two_n))
    if w2_bias is not None:
        _shape("w2_bias", w2_bias, (E, K))

    global_e = E
    if expert_map is not None:
        if expert_map.dim() != 1:
            raise ValueError("expert_map must be 1-D [global_num_experts]")
        global_e = expert_map.numel()

    block: tuple[int, int] | None = None
    if quant is None:
        if w1.dtype != x.dtype or w2.dtype != x.dtype:
            raise ValueError(
                f"without quant, w1 and w2 must have hidden_states' dtype {x.dtype}, "
                f"got {w1.dtype} and {w2.dtype}"
            )
        for name, t in (("w1_scale", w1_scale), ("w2_scale", w2_scale),
                        ("a1_scale", a1_scale), ("a2_scale", a2_scale)):  # fmt: skip
            if t is not None:
                raise ValueError(f"{name} given but quant is None")
        if block_shape is not None or per_channel_quant:
            raise ValueError("block_shape and per_channel_quant need quant fp8_w8a8 or int8_w8a8")
        return MoeArgs(None, global_e)
    if quant not in QUANTS:
        raise ValueError(f"quant must be None or one of {', '.join(QUANTS)}, got {quant!r}")
    wanted = (torch.int8,) if quant.startswith("int8") else FP8_DTYPES
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype not in wanted:
            raise ValueError(
                f"{name} must be {' or '.join(map(str, wanted))} for {quant}, got {t.dtype}"
            )
    if w1.dtype != w2.dtype:
        raise ValueError(f"w1 and w2 must share a dtype, got {w1.dtype} and {w2.dtype}")
    if quant == "int8_w8a16":
        if block_shape is not None or per_channel_quant:
            raise ValueError("int8_w8a16 takes per-channel weight scales only: no block_shape")
        if a1_scale is not None or a2_scale is not None:
            raise ValueError("int8_w8a16 keeps activations unquantized: no a1_scale/a2_scale")
        _shape("w1_scale", w1_scale, (E, two_n))
        _shape("w2_scale", w2_scale, (E, K))
        return MoeArgs(None, global_e)

    if block_shape is not None:
        if per_channel_quant:
            raise ValueError("per_channel_quant and block_shape are exclusive")
        if len(block_shape) != 2 or any(int(b) <= 0 for b in block_shape):
            raise ValueError(f"block_shape must be [bn, bk] of positive ints, got {block_shape}")
        bn, bk = (int(b) for b in block_shape)
        block = (bn, bk)
        _shape("w1_scale", w1_scale, (E, -(-two_n // bn), -(-K // bk)))
        _shape("w2_scale", w2_scale, (E, -(-K // bn), -(-N // bk)))
        if a1_scale is not None or a2_scale is not None:
            raise ValueError("block-wise activation scales are dynamic: pass no a1_scale/a2_scale")
    elif per_channel_quant:
        _shape("w1_scale", w1_scale, (E, two_n))
        _shape("w2_scale", w2_scale, (E, K))
    else:
        for name, t in (("w1_scale", w1_scale), ("w2_scale", w2_scale)):
            if t is None or not _scale_shape_ok(t, [(E,), (E, 1), (E, 1, 1)]):
                got = None if t is None else list(t.shape)
                raise ValueError(f"{name} must have shape [{E}] for per-tensor {quant}, got {got}")
    for name, t, rows in (("a1_scale", a1_scale, M), ("a2_scale", a2_scale, M * topk_ids.shape[1])):
        if t is None:
            continue
        ok = [(1,), ()] + ([(rows, 1)] if per_channel_quant else [])
        if not _scale_shape_ok(t, ok):
            shapes = "[1] or [T, 1]" if per_channel_quant else "[1]"
            raise ValueError(f"{name} must have shape {shapes}, got {list(t.shape)}")
    return MoeArgs(block, global_e)
