"""Quantization helpers shared by the op and the reference (the only code they share).

Scale shapes follow vLLM (DESIGN §2):
  activations: per tensor ``[1]``, per token ``[T, 1]``, per token-group ``[T, ceil(K/bk)]``;
  weights:     per tensor ``[E]``, per channel ``[E, N_out]``,
               per block ``[E, ceil(N_out/bn), ceil(K/bk)]``.
Everything here is plain PyTorch on the tensor's device, with no host synchronisation, so the op
stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

QUANTS = ("fp8_w8a8", "int8_w8a8", "int8_w8a16")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
INT8_MAX = 127.0
# A scale of exactly zero (an all-zero row) would divide by zero; any positive floor works since
# the quantized values are then all zero.
_MIN_AMAX = 1e-12


def quant_max(dtype: torch.dtype) -> float:
    """Largest representable magnitude of a quantized dtype (448 for e4m3fn, 240 for e4m3fnuz)."""
    if dtype == torch.int8:
        return INT8_MAX
    return float(torch.finfo(dtype).max)


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``max(amax, 1e-12) / qmax``, correctly rounded on every device. PyTorch divides a CUDA
    tensor by a Python number as a multiplication by its reciprocal (one ulp off amax / 448 for
    some amax), which the Triton quantization kernels and vLLM's do not: a scale one ulp apart
    flips the rounding of codes near a midpoint, and a flipped outlier moved whole output rows
    of an H100 fp8 check past its tolerance. Dividing by a tensor of the same shape is exact."""
    amax = amax.clamp(min=_MIN_AMAX)
    return amax / torch.full_like(amax, qmax)


def _to_quant(x: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    qmax = quant_max(qdtype)
    y = x.float() / scale
    if qdtype == torch.int8:
        y = torch.round(y)
    return y.clamp(-qmax, qmax).to(qdtype)


def static_scale(scale: torch.Tensor, T: int) -> torch.Tensor:
    """A given activation scale as fp32 ``[1]`` (per tensor) or ``[T, 1]`` (per token)."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1)
    if scale.shape not in ((T, 1), (T,)):
        raise ValueError(
            f"activation scale must have shape [1] or [{T}, 1], got {tuple(scale.shape)}"
        )
    return scale.reshape(T, 1)


def quantize_activation(
    x: torch.Tensor,
    qdtype: torch.dtype,
    *,
    scale: torch.Tensor | None = None,
    per_token: bool = False,
    group_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[T, K]`` activation; returns ``(x_q, scale)``.

    With ``scale`` given the quantization is static (a ``[1]`` or ``[T, 1]`` scale), else the
    scale is dynamic: amax / qmax per tensor, per token (``per_token``) or per token and group of
    ``group_k`` columns (block-wise quantization).
    """
    if x.dim() != 2:
        raise ValueError(f"activation must be 2-D [T, K], got shape {tuple(x.shape)}")
    qmax = quant_max(qdtype)
    T, K = x.shape
    if group_k is not None:
        if scale is not None:
            raise ValueError("block-wise activation quantization is always dynamic")
        n_groups = -(-K // group_k)
        pad = n_groups * group_k - K
        xf = torch.nn.functional.pad(x.float(), (0, pad)).view(T, n_groups, group_k)
        s = _scale_from_amax(xf.abs().amax(dim=-1), qmax)  # [T, G]
        q = _to_quant(xf, s.unsqueeze(-1), qdtype).view(T, n_groups * group_k)[:, :K]
        return q.contiguous(), s
    if scale is None:
        if per_token:
            scale = _scale_from_amax(x.float().abs().amax(dim=-1, keepdim=True), qmax)
        else:
            scale = _scale_from_amax(x.float().abs().amax(), qmax).reshape(1)
    else:
        scale = static_scale(scale, T)
    q = _to_quant(x, scale if scale.dim() == 2 else scale.reshape(1, 1), qdtype)
    return q, scale


def quantize_weight(
    w: torch.Tensor,
    quant: str,
    *,
    per_channel: bool = False,
    block_shape: tuple[int, int] | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[E, N_out, K]`` weights as a checkpoint stores them; returns ``(w_q, scale)``.

    int8_w8a16 is always per output channel; w8a8 is per tensor (``[E]``), per channel
    (``[E, N_out]``) or per block (``[E, ceil(N_out/bn), ceil(K/bk)]``).
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}")
    qdtype = torch.int8 if quant.startswith("int8") else fp8_dtype
    qmax = quant_max(qdtype)
    E, n_out, K = w.shape
    wf = w.float()
    if block_shape is not None:
        bn, bk = block_shape
        gn, gk = -(-n_out // bn), -(-K // bk)
        padded = torch.nn.functional.pad(wf, (0, gk * bk - K, 0, gn * bn - n_out))
        blocks = padded.view(E, gn, bn, gk, bk)
        s = blocks.abs().amax(dim=(2, 4)).clamp(min=_MIN_AMAX) / qmax  # [E, gn, gk]
        q = _to_quant(blocks, s[:, :, None, :, None], qdtype).view(E, gn * bn, gk * bk)
        return q[:, :n_out, :K].contiguous(), s
    if per_channel or quant == "int8_w8a16":
        s = wf.abs().amax(dim=-1).clamp(min=_MIN_AMAX) / qmax  # [E, N_out]
        return _to_quant(wf, s.unsqueeze(-1), qdtype), s
    s = wf.abs().amax(dim=(1, 2)).clamp(min=_MIN_AMAX) / qmax  # [E]
    return _to_quant(wf, s[:, None, None], qdtype), s


def dequantize_weight(
    w_q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """Float64 weights ``w_q · scale`` for one or all experts (used by the reference)."""
    wd = w_q.double()
    s = scale.double()
    if block_shape is not None:
        bn, bk = block_shape
        n_out, K = wd.shape[-2:]
        s = s.repeat_interleave(bn, dim=-2)[..., :n_out, :]
        s = s.repeat_interleave(bk, dim=-1)[..., :K]
        return wd * s
    if s.dim() == wd.dim() - 1:  # per channel [.., N_out]
        return wd * s.unsqueeze(-1)
    return wd * s.reshape(s.shape + (1,) * (wd.dim() - s.dim()))


def dequantize_activation(
    x_q: torch.Tensor, scale: torch.Tensor, group_k: int | None = None
) -> torch.Tensor:
    """Float64 activations ``x_q · scale`` (used by the reference)."""
    xd = x_q.double()
    s = scale.double()
    if group_k is not None:
        return xd * s.repeat_interleave(group_k, dim=-1)[:, : xd.shape[1]]
    return xd * (s if s.dim() == 2 else s.reshape(1, 1))
