"""The MoE problem a kernel config is tuned for (one layer shape, one dtype, one quantization)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
QUANTS = ("fp8_w8a8", "int8_w8a8", "int8_w8a16")
ACTIVATIONS = ("silu", "swigluoai")


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; raises ValueError for names moetune does not compute in."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class Problem:
    """One fused-MoE layer: x [M, K], w1 [E, 2N, K], w2 [E, K, N], top-k routing.

    ``N`` is the intermediate size per tensor-parallel shard, as in vLLM's table names.
    ``dtype`` is the compute/output dtype; ``quant`` the table's quantization name.
    """

    E: int
    N: int
    K: int
    topk: int
    dtype: str = "bfloat16"
    quant: str | None = None
    block_shape: tuple[int, int] | None = None
    per_channel: bool = False
    bias: bool = False
    activation: str = "silu"

    def __post_init__(self) -> None:
        for field in ("E", "N", "K", "topk"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.topk > self.E:
            raise ValueError(f"topk ({self.topk}) cannot exceed the number of experts E ({self.E})")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.quant is not None and self.quant not in QUANTS:
            raise ValueError(f"unknown quant {self.quant!r}; expected one of {', '.join(QUANTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.block_shape is not None:
            bs = tuple(self.block_shape)
            if len(bs) != 2 or any(
                not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in bs
            ):
                raise ValueError(
                    f"block_shape must be two positive integers, got {self.block_shape!r}"
                )
            if bs[1] % 16:
                # A K tile (a power of two >= 16 for tl.dot) may not straddle two scale groups.
                raise ValueError(f"block_shape bk={bs[1]} is not a multiple of 16: no K tile fits")
            if self.quant not in ("fp8_w8a8", "int8_w8a8"):
                raise ValueError("block_shape needs quant fp8_w8a8 or int8_w8a8")
            object.__setattr__(self, "block_shape", bs)
        if self.per_channel and self.quant not in ("fp8_w8a8", "int8_w8a8"):
            raise ValueError("per_channel needs quant fp8_w8a8 or int8_w8a8")
        if self.per_channel and self.block_shape is not None:
            raise ValueError("per_channel and block_shape are exclusive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def table_dtype(self) -> str | None:
        """The ``dtype=`` part of the table file name (DESIGN §3): none for bf16/fp16."""
        if self.quant is not None:
            return self.quant
        return "float32" if self.dtype == "float32" else None

    @property
    def takes_static_scales(self) -> bool:
        """Whether activations can be quantized with static scales: w8a8 with per-tensor scales
        (per-token and block-wise scales are computed for each call)."""
        w8a8 = self.quant in ("fp8_w8a8", "int8_w8a8")
        return w8a8 and not self.per_channel and not self.block_shape

    def slug(self) -> str:
        """A file-name-safe identity, e.g. ``E8-N7168-K4096-top2-bfloat16-fp8_w8a8``."""
        parts = [f"E{self.E}", f"N{self.N}", f"K{self.K}", f"top{self.topk}", self.dtype]
        parts += [self.quant] if self.quant else []
        parts += ["block{}x{}".format(*self.block_shape)] if self.block_shape else []
        parts += ["perchannel"] if self.per_channel else []
        parts += ["bias"] if self.bias else []
        parts += [self.activation] if self.activation != "silu" else []
        return "-".join(parts)

    def describe(self) -> str:
        parts = [f"E={self.E}", f"N={self.N}", f"K={self.K}", f"topk={self.topk}", self.dtype]
        if self.quant:
            parts.append(self.quant)
        if self.block_shape:
            parts.append(f"block={list(self.block_shape)}")
        if self.per_channel:
            parts.append("per-channel")
        if self.bias:
            parts.append("bias")
        if self.activation != "silu":
            parts.append(self.activation)
        return " ".join(parts)
