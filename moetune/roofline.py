"""The roofline floor of the MoE op: ceilings measured on the device, bytes and FLOPs of a batch.

The floor is ``max(bytes / bandwidth, FLOPs / peak)`` with the ceilings the device actually
sustains (a large copy, dense GEMMs), so ``time / floor`` is the headroom a better kernel config
could still win; at small batch sizes the op is bound by reading the weights of the experts the
batch touches, at large ones by the tensor cores. Without a GPU there are no ceilings and no floor.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moetune.inputs import SKEWS
from moetune.problem import Problem

COPY_BYTES = 1 << 30  # the buffers that measure bandwidth: a 1 GiB copy and a 1 GiB reduction
MATMUL_SIZE = 8192  # the square GEMM that measures the tensor-core peak
CEILING_RUNS = 10


@dataclass(frozen=True)
class Ceilings:
    """What the device sustains (None: unknown). ``bandwidth_Bps`` is the better of a large copy
    (read + write bytes) and a large reduction (read bytes): streaming reads, which is what the
    op's weights are, run faster than a copy (H100: ~3.3 TB/s against ~3.0)."""

    bandwidth_Bps: float | None
    bf16_flops: float | None
    fp8_flops: float | None
    copy_Bps: float | None = None
    read_Bps: float | None = None

    @property
    def available(self) -> bool:
        return self.bandwidth_Bps is not None and self.bf16_flops is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "bandwidth_GBps": _round(self.bandwidth_Bps, 1e9),
            "copy_GBps": _round(self.copy_Bps, 1e9),
            "read_GBps": _round(self.read_Bps, 1e9),
            "bf16_TFLOPs": _round(self.bf16_flops, 1e12),
            "fp8_TFLOPs": _round(self.fp8_flops, 1e12),
        }


def _round(v: float | None, unit: float) -> float | None:
    return None if v is None else round(v / unit, 1)


def _median_ms(fn: Callable[[], object], runs: int = CEILING_RUNS, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(start, end, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end, strict=True))


def _bandwidths(device: torch.device) -> tuple[float, float]:
    src = torch.zeros(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = 2 * COPY_BYTES / (_median_ms(lambda: dst.copy_(src)) * 1e-3)
    read = COPY_BYTES / (_median_ms(lambda: src.sum()) * 1e-3)
    return copy, read


def _fp8_flops(a: torch.Tensor, b: torch.Tensor) -> float | None:
    scaled_mm = getattr(torch, "_scaled_mm", None)
    if scaled_mm is None:
        return None
    one = torch.ones((), device=a.device, dtype=torch.float32)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        try:
            a8 = a.to(fp8)
            b8 = b.t().contiguous().to(fp8).t()  # _scaled_mm wants the second operand column-major
            ms = _median_ms(
                lambda a8=a8, b8=b8: scaled_mm(
                    a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
                )
            )
            return 2 * MATMUL_SIZE**3 / (ms * 1e-3)
        except Exception:  # no fp8 GEMM on this GPU/build, or not in this flavour
            continue
    return None


def measure_ceilings(device: torch.device | str) -> Ceilings:
    """Bandwidth from a 1 GiB device-to-device copy (read + write bytes) and a 1 GiB sum (read
    bytes), FLOP/s from 8192³ bf16 and fp8 (``torch._scaled_mm``) GEMMs; medians of timed runs
    after warm-up.

    These are sustained ceilings, not datasheet numbers: a floor built on them is one the device
    can actually approach. On a non-CUDA device (the interpreter) every value is None.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return Ceilings(None, None, None)
    with torch.cuda.device(device):
        copy, read = _bandwidths(device)
        n = MATMUL_SIZE
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty_like(a)
        bf16 = 2 * n**3 / (_median_ms(lambda: torch.mm(a, b, out=c)) * 1e-3)
        fp8 = _fp8_flops(a, b)
    return Ceilings(max(copy, read), bf16, fp8, copy, read)


def expected_experts(E: int, M: int, topk: int, *, topk_routing: str = "uniform") -> float:
    """Expected number of distinct experts that M tokens route to.

    ``uniform``: each token picks ``topk`` distinct experts uniformly, so one token misses a given
    expert with probability ``1 − topk/E`` and M tokens touch ``E·(1 − (1 − topk/E)^M)`` experts
    (exactly ``topk`` at M=1). Treating the ``M·topk`` picks as independent draws,
    ``E·(1 − (1 − 1/E)^(M·topk))``, undercounts slightly, since it lets a token repeat an expert.
    ``one-hot``: the skew of :func:`moetune.inputs.random_routing` pins experts 0 and 1 to the
    first two slots; the other ``topk − 2`` are uniform over the remaining ``E − 2`` experts.
    """
    if topk_routing not in SKEWS:
        raise ValueError(f"topk_routing must be one of {', '.join(SKEWS)}, got {topk_routing!r}")
    fixed = 0 if topk_routing == "uniform" else min(topk, 2)
    free, pool = topk - fixed, E - fixed
    if free == 0:
        return float(fixed)
    return fixed + pool * (1.0 - (1.0 - free / pool) ** M)


def _weight_scale_elems(problem: Problem) -> int:
    """float32 weight-scale elements per expert, both GEMMs (vLLM's scale shapes)."""
    N, K = problem.N, problem.K
    if problem.quant is None:
        return 0
    if problem.block_shape is not None:
        bn, bk = problem.block_shape
        return -(-2 * N // bn) * -(-K // bk) + -(-K // bn) * -(-N // bk)
    if problem.per_channel or problem.quant == "int8_w8a16":
        return 2 * N + K
    return 2


def traffic_bytes(
    problem: Problem, M: int, *, topk_routing: str = "uniform", experts: float | None = None
) -> float:
    """Bytes the op must move at batch size M (see :func:`floor_us`)."""
    E, N, K, k = problem.E, problem.N, problem.K, problem.topk
    b = problem.torch_dtype.itemsize
    per_expert = (2 * N * K + K * N) * (1 if problem.quant else b)
    per_expert += 4 * _weight_scale_elems(problem) + (b * (2 * N + K) if problem.bias else 0)
    slots = M * k
    moved = 2 * M * K * b  # x read, output written
    moved += 2 * slots * (2 * N + N + K) * b  # GEMM1 out, activation out, GEMM2 out: write + read
    if problem.quant in ("fp8_w8a8", "int8_w8a8"):
        moved += 2 * (M * K + slots * N)  # the 1-byte re-quantized activations: write + read
    moved += slots * 8  # router weights (fp32) and ids (int32)
    if experts is None:
        experts = expected_experts(E, M, k, topk_routing=topk_routing)
    return experts * per_expert + moved


def moe_flops(problem: Problem, M: int) -> float:
    """``2·M·topk·(2N·K + N·K)``: both GEMMs on every routed slot (the activation is negligible)."""
    return 2.0 * M * problem.topk * (2 * problem.N * problem.K + problem.N * problem.K)


@dataclass(frozen=True)
class Floor:
    us: float
    bytes: float
    flops: float
    bound: str  # "memory" or "compute"
    experts: float

    def as_dict(self) -> dict[str, Any]:
        return {"us": round(self.us, 3), "bytes": round(self.bytes), "flops": self.flops,
                "bound": self.bound, "experts": round(self.experts, 3)}  # fmt: skip


def roofline(
    problem: Problem,
    M: int,
    ceilings: Ceilings,
    *,
    topk_routing: str = "uniform",
    experts: float | None = None,
) -> Floor:
    """:func:`floor_us` with its parts: bytes, FLOPs, which ceiling binds, experts touched."""
    if not ceilings.available:
        raise ValueError("no measured ceilings (no GPU): the floor is not available")
    peak = ceilings.bf16_flops
    if problem.quant in ("fp8_w8a8", "int8_w8a8") and ceilings.fp8_flops:
        peak = ceilings.fp8_flops
    if experts is None:
        experts = expected_experts(problem.E, M, problem.topk, topk_routing=topk_routing)
    nbytes = traffic_bytes(problem, M, experts=experts)
    flops = moe_flops(problem, M)
    t_mem, t_compute = nbytes / ceilings.bandwidth_Bps, flops / peak
    bound = "memory" if t_mem >= t_compute else "compute"
    return Floor(max(t_mem, t_compute) * 1e6, nbytes, flops, bound, experts)


def floor_us(
    problem: Problem,
    M: int,
    ceilings: Ceilings,
    *,
    topk_routing: str = "uniform",
    experts: float | None = None,
) -> float:
    """The least time the op can take: ``max(bytes / bandwidth, flops / peak)`` in µs.

    bytes: the weights of the experts the batch touches (:func:`expected_experts` ×
    ``(2N·K + K·N)`` × weight bytes, plus their float32 scales and biases), plus the activations
    read and written once each: x and the output (``M·K``), GEMM1's output (``M·topk·2N``), the
    activation's output (``M·topk·N``), GEMM2's per-slot output (``M·topk·K``), the 1-byte
    re-quantized activations of w8a8, and the router weights and ids.
    flops: ``2·M·topk·(2N·K + N·K)``. peak: the fp8 GEMM's for w8a8 problems (int8 dots run at the
    8-bit tensor-core rate, which equals fp8's on Hopper; bf16's would put the floor above what the
    kernel can reach), bf16's otherwise (also for fp32, whose ieee dots are far slower: the floor
    is then loose but still a floor). Raises ValueError without ceilings (the interpreter).
    ``experts`` overrides the expectation with the number of experts a given batch does route to
    (one draw of M=4 tokens can touch 5 experts where 5.5 are expected).
    """
    return roofline(problem, M, ceilings, topk_routing=topk_routing, experts=experts).us
