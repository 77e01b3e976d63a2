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

Re-quantization (w8a8): the op quantizes GEMM1's activated output to fp8/int8 again before GEMM2.
An element whose exact value sits near a rounding midpoint may round either way in a correct op,
since the op's activation differs from the float64 one by a few compute-dtype ulps (bf16 roundings
of the gate, the up projection and the product) and by its GEMM1 accumulation (fp32, or Hopper's
reduced-precision fp8 partial sums). Each such flip moves an element by a whole quantization step
(1/8–1/16 of it for e4m3), and one flipped large element can move a whole output row by several
percent: the worst row of thousands grows with M although nothing is wrong. So
:meth:`Reference.matching` takes the re-quantized activation the op actually fed GEMM2 and adopts
each of its codes that is the next code across a rounding boundary lying within ``REQUANT_ETA``
(relative) of the reference's exact value, and its dynamic scale when within ``SCALE_ETA`` of the
reference's; every other code and scale stays the reference's own. A GEMM1, activation or
quantization error larger than that still shows in full, and GEMM2 and its epilogue are checked
against exactly the operand the op used.

Known limit: an error of the activation below ``REQUANT_ETA`` that is the same everywhere (a
scale 2% off) moves codes only across boundaries inside the band, so it is adopted and does not
show. The plain comparison let such an error pass too (under the 4e-2 bound) except in the worst
rows of large batches. Checking GEMM1's output and the activation against their own inputs would
close it.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.quant import (
    dequantize_activation,
    dequantize_weight,
    quant_max,
    quantize_activation,
)
from moetune.validate import validate_moe_args

EPILOGUES = (
    "dequant-bias-route-cast",
    "bias-before-dequant",
    "route-before-bias",
    "cast-before-route",
)
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
# How far (relative) the op's activation may sit from the float64 one before re-quantization:
# four bf16 ulps (2⁻⁸ each) for the roundings of gate, up and their product, as many again for the
# GEMM1 accumulation. A one-step rounding difference of an element within this band is adopted.
REQUANT_ETA = 2.0**-5
# How far (relative) the op's dynamic re-quantization scale may sit from the reference's: its
# amax is one element of the activation, within a few bf16 ulps of the reference's.
SCALE_ETA = 2.0**-6
MATCH_BLOCK = 1 << 22  # elements per block of rows in matching()


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


class Reference:
    """The float64 reference of one set of inputs, computed once.

    Same arguments and meaning as :func:`moetune.fused_experts` (``config`` and ``config_down``
    are ignored).
    ``output`` is the reference result; :meth:`matching` is the result the op must match given
    the activation it re-quantized between the GEMMs (see the module doc).
    """

    def __init__(
        self,
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
        config_down: dict[str, Any] | None = None,
        expert_map: torch.Tensor | None = None,
        epilogue: str = "dequant-bias-route-cast",
    ):
        del config, config_down
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
        self.w8a8 = quant in ("fp8_w8a8", "int8_w8a8")
        self.qdtype = w1.dtype
        self.group_k = block[1] if block is not None else None
        self._gemm_kw = dict(out_dtype=dtype, quant=quant, block_shape=block, epilogue=epilogue)
        self._w2, self._w2_scale, self._w2_bias = w2, w2_scale, w2_bias
        self._shape = (M, topk, K)

        ids = topk_ids.long()
        local = ids if expert_map is None else expert_map.to(ids.device).long()[ids]
        self._slot_expert = local.reshape(-1)  # [M·topk], -1 = on another rank
        slot_token = torch.arange(M, device=ids.device).repeat_interleave(topk)

        a1, a1s = hidden_states, None
        if self.w8a8:
            a1, a1s = quantize_activation(
                hidden_states, w1.dtype, scale=a1_scale, per_token=per_channel_quant,
                group_k=self.group_k,
            )  # fmt: skip

        n2 = w1.shape[1]
        cache1 = torch.zeros(M * topk, n2, dtype=dtype, device=hidden_states.device)
        for e, slots in self._expert_slots(torch.ones_like(self._slot_expert, dtype=torch.bool)):
            toks = slot_token[slots]
            cache1[slots] = _gemm64(
                a1[toks], _rows_scale(a1s, toks), w1[e], _expert_scale(w1_scale, e),
                None if w1_bias is None else w1_bias[e], None, **self._gemm_kw,
            )  # fmt: skip
        # The activation before re-quantization, kept for matching().
        self.h = _activation64(cache1, activation).to(dtype)

        a2, a2s = self.h, None
        if self.w8a8:
            a2, a2s = quantize_activation(
                self.h, w1.dtype, scale=a2_scale, per_token=per_channel_quant,
                group_k=self.group_k,
            )  # fmt: skip
        self.a2, self.a2s = a2, a2s
        self._route = topk_weights.reshape(-1).float()
        self._cache3 = torch.zeros(M * topk, K, dtype=dtype, device=hidden_states.device)
        self._gemm2(self._cache3, a2, a2s, torch.ones_like(self._slot_expert, dtype=torch.bool))
        self.output = self._sum(self._cache3)
        if not self.w8a8:  # matching() needs them only after a re-quantization
            self.h = self.a2 = self._cache3 = None

    def _expert_slots(self, wanted: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(expert, slot ids)`` for each local expert holding a wanted slot."""
        se = torch.where(wanted, self._slot_expert, -1)
        order = torch.argsort(se, stable=True)
        counts = torch.bincount(se[order] + 1).tolist()  # one host sync for all experts
        out, start = [], counts[0] if counts else 0  # bin 0: slots of other ranks / not wanted
        for e, n in enumerate(counts[1:]):
            if n:
                out.append((e, order[start : start + n]))
            start += n
        return out

    def _gemm2(
        self, cache3: torch.Tensor, a2: torch.Tensor, a2s: torch.Tensor | None,
        wanted: torch.Tensor,
    ) -> None:  # fmt: skip
        for e, slots in self._expert_slots(wanted):
            cache3[slots] = _gemm64(
                a2[slots], _rows_scale(a2s, slots), self._w2[e], _expert_scale(self._w2_scale, e),
                None if self._w2_bias is None else self._w2_bias[e], self._route[slots],
                **self._gemm_kw,
            )  # fmt: skip

    def _sum(self, cache3: torch.Tensor) -> torch.Tensor:
        return cache3.view(*self._shape).double().sum(dim=1).to(cache3.dtype)

    def matching(
        self,
        requantized: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        eta: float = REQUANT_ETA,
    ) -> torch.Tensor:
        """The reference output given ``requantized = (a2, a2_scale)``, the op's re-quantized
        activation ``[M·topk, N]`` and its scale. A scale within ``SCALE_ETA`` of the
        reference's replaces it; a code replaces the reference's own only when it is the next
        code across the rounding boundary and the exact value lies within ``eta`` (relative) of
        that boundary. GEMM2 is recomputed for the slots that changed. Without ``requantized``
        (or without w8a8), ``output``."""
        if requantized is None or not self.w8a8:
            return self.output
        a2_op, s_op = requantized
        s_ref = self.a2s
        if a2_op.shape != self.a2.shape or s_op.numel() != s_ref.numel():
            raise ValueError(
                f"re-quantized activation {list(a2_op.shape)} with {s_op.numel()} scale(s) does "
                f"not match the reference's {list(self.a2.shape)} with {s_ref.numel()}"
            )
        s_op = s_op.to(s_ref.device, torch.float32).reshape(s_ref.shape)
        s_used = torch.where((s_op - s_ref).abs() <= SCALE_ETA * s_ref.abs(), s_op, s_ref)
        s_elem = self._per_element(s_used)
        rows, n = self.a2.shape
        used = torch.empty_like(self.a2)
        # In blocks of rows: the float64 temporaries of a whole large batch would take GBs.
        step = max(1, MATCH_BLOCK // max(n, 1))
        for r in range(0, rows, step):
            block = slice(r, r + step)
            used[block] = self._codes(block, a2_op, s_elem, eta)
        changed = (used.view(torch.uint8) != self.a2.view(torch.uint8)).any(dim=1) | (
            (s_used != s_ref).reshape(s_ref.shape[0], -1).any(dim=1)
            if s_ref.numel() > 1
            else (s_used != s_ref).expand(rows)
        )
        if not bool(changed.any()):
            return self.output
        cache3 = self._cache3.clone()
        self._gemm2(cache3, used, s_used, changed)
        return self._sum(cache3)

    def _codes(
        self, rows: slice, a2_op: torch.Tensor, s_elem: torch.Tensor, eta: float
    ) -> torch.Tensor:
        """The codes GEMM2 is judged with, for ``rows``: the op's where it flipped a rounding
        (the code next to the reference's own, across the boundary between the two, with the
        exact value within ``eta`` of that boundary), else the reference's own."""
        h, s = self.h[rows], s_elem[rows]
        own = _round_to(h.float() / s, self.qdtype)  # as the quantizers divide: fp32
        exact = h.double() / s.double()
        v = a2_op[rows].to(exact.device)
        adjacent = (_ordinal(v) - _ordinal(own.to(self.qdtype))).abs() == 1
        v = v.double()
        near = ((v + own) / 2 - exact).abs() <= eta * exact.abs()
        return torch.where(adjacent & near, v, own).to(self.qdtype)

    def _per_element(self, s: torch.Tensor) -> torch.Tensor:
        """A re-quantization scale ``[1]``, ``[S, 1]`` or ``[S, G]`` spread over ``[S, N]``."""
        rows, n = self.a2.shape
        if s.numel() == 1:
            return s.reshape(1, 1).expand(rows, n)
        if self.group_k is not None:
            return s.repeat_interleave(self.group_k, dim=-1)[:, :n]
        return s.reshape(rows, 1).expand(rows, n)


def _round_to(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """``x`` (already divided by its scale) rounded as the quantizers round, as float64."""
    qmax = quant_max(qdtype)
    y = x.float()
    if qdtype == torch.int8:
        y = torch.round(y)
    return y.clamp(-qmax, qmax).to(qdtype).double()


def _ordinal(q: torch.Tensor) -> torch.Tensor:
    """Codes of a quantized dtype as integers in value order (adjacent codes differ by 1)."""
    if q.dtype == torch.int8:
        return q.to(torch.int32)
    bits = q.view(torch.uint8).to(torch.int32)  # fp8: sign bit, then magnitude in order
    mag = bits & 0x7F
    return torch.where(bits >= 0x80, -mag, mag)


def _rows_scale(s: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    if s is None or s.numel() == 1:
        return s
    return s[rows]


def _expert_scale(s: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if s is None else s[e]


def fused_experts_reference(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Same signature and meaning as :func:`moetune.fused_experts` (``config`` is ignored), plus
    ``epilogue`` (see the module doc): :class:`Reference`'s ``output``."""
    return Reference(*args, **kwargs).output
