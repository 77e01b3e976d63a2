"""The MoE op: routing metadata, GEMM1 (+bias), activation, re-quantization, GEMM2 (+bias,
× router weight), sum over top-k. Conventions follow vLLM (DESIGN §2)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch

from moetune import launch
from moetune.activation import apply_activation, apply_activation_quantized, apply_activation_torch
from moetune.align import LiveRows, RoutingBlocks, direct_slots, moe_align_block_size_torch
from moetune.align_kernel import align_and_quantize, moe_align_block_size
from moetune.gather import gather_sorted, gather_sorted_torch
from moetune.launch import compiling, invoke_moe_gemm
from moetune.problem import ACTIVATIONS
from moetune.quant import FP8_DTYPES, static_scale
from moetune.quant import quantize_activation as quantize_activation_torch
from moetune.quant_kernel import quantize_activation_fast as quantize_activation
from moetune.topk_sum import topk_sum
from moetune.validate import validate_moe_args

# The activation and a static-scale fp8 re-quantization in one launch (same bits as the two
# steps). Faster at every fp8 point timed on an NVIDIA H200: results/kernels/NOTES.md §9.
FUSE_ACTIVATION_QUANT = True
# The activation (and a static-scale fp8 re-quantization) in GEMM1's epilogue: same bits again,
# without the [slots, 2N] intermediate or the activation's launch. 1.8% faster over 42 points on
# an H100, slower on a few silu tiles tuned before it (results/kernels/NOTES.md §12).
FUSE_GEMM1_ACTIVATION = True
# ... except with a static fp8 scale above this many tokens (None: no limit), where the
# epilogue's activation + re-quantization measured slower than the separate launch with the
# shipped tables: by 0.6-14% at 11 of the 12 fp8 points with M >= 128 on an H200, within noise
# on an H100 (results/kernels/NOTES.md §13). Faster at every fp8 point with M <= 32 on both.
FUSE_GEMM1_STATIC_FP8_MAX_M: int | None = 64
# The sum over top-k in GEMM2's epilogue, from this many tokens up (None: never): fp32 atomic adds
# into an [M, K] buffer instead of GEMM2 writing [M·topk, K] and torch's reduce kernel reading it
# back. Same bits up to the order of fp32 additions (kernel.py). Off: measured slower at every
# M=4096 point on an H100 and an H200 (up to 17%: the atomics cost more than the reduce), faster
# by at most 3% at M <= 32, and at topk > 2 its addition order, so its bits, change from run to
# run (results/kernels/NOTES.md §14). Changing the default changes the op's timings: bump the
# version.
SUM_TOPK_IN_GEMM2_MIN_M: int | None = None
# fp8_w8a8 with one static per-tensor input scale, at decode sizes (the routing's one-program
# path, align_kernel.ONE_PROGRAM_SLOTS slots): the input's quantization runs in the routing's
# launch (align_kernel.align_and_quantize), the same bits with one launch fewer. 1.7-3.5 µs
# faster at every such point on an H100 and an H200, e.g. Qwen3-30B-A3B M=32 109.7 -> 107.8 µs
# on the H100 (results/kernels/NOTES.md §16). Not where DIRECT_SLOTS_MAX_M skips the routing
# launch (M=1): the input's quantization runs in its own launch there. Changing it changes the
# op's timings: bump the version.
QUANTIZE_IN_ROUTING = True
# The sum over top-k in moetune's own Triton kernel (topk_sum.py: fp32 in slot order, one cast)
# instead of PyTorch's reduce over the middle dimension of [M, topk, K]. Changing it changes the
# op's timings: bump the version.
TOPK_SUM_KERNEL = True
# Up to this many tokens (None: never) the GEMMs take one slot a block straight from topk_ids
# (align.direct_slots) instead of the routing launch's expert-sorted blocks: at M=1 the top-k
# experts are distinct, so the blocks are the same ones in another order, and the routing launch
# goes (with a static fp8 input scale, whose quantization rode in it, the quantization keeps a
# launch of its own). Not with an expert_map. 2-3.5 µs faster at M=1 in bf16 and block fp8 on
# an H100, 0.5-0.9 µs with static fp8 (results/kernels/NOTES.md §20). Changing it changes the
# op's timings: bump the version.
DIRECT_SLOTS_MAX_M: int | None = 1
# From this many tokens (None: never) GEMM1 stores its rows at the routing's sorted positions
# ([EM, n], padded rows unwritten) and GEMM2 reads them as contiguous blocks, through TMA where
# the GPU has it (launch.SORTED_TMA), instead of gathering slot rows by pointer; the steps
# between them take only the rows that hold a slot (align.LiveRows). Not with direct slots, up
# and down tiles of different BLOCK_SIZE_M (other padding), per-token scales (dynamic or
# static), or a dynamic per-tensor scale of GEMM2's input (its maximum would take in the padded
# rows).
# Changing it changes the op's timings: bump the version.
SORTED_MIN_M: int | None = None
# From this many tokens (None: never) the input is gathered into the routing's sorted positions
# first (moetune.gather, one launch), so GEMM1 reads contiguous blocks too (through TMA where the
# GPU has it). Not with direct slots. Changing it changes the op's timings: bump the version.
SORTED_INPUT_MIN_M: int | None = None
# Both of the above, whatever those limits say, for an unquantized op with top-k at most
# SORTED_AUTO_MAX_TOPK from this many tokens (None: never), where the sorted rows load through TMA
# (launch.sorted_rows_tma: NVIDIA compute capability 9+, tiles of WEIGHTS_TMA_MIN_BLOCK_M rows or
# more), with up and down tiles of one BLOCK_SIZE_M. Measured at top-2 only; on an H100,
# Mixtral-8x7B bf16 (top-2) was 1.05-1.16x faster at M = 1024, 2048 and 4096 in three runs; below
# 1024 the sign changed from one batch size to the next, and every quantized or top-4/top-8 point
# timed was slower (results/kernels/NOTES.md §26-§28). Changing either changes the op's timings:
# bump the version.
SORTED_AUTO_MIN_M: int | None = 1024
SORTED_AUTO_MAX_TOPK = 2

_POISON: contextvars.ContextVar[bool] = contextvars.ContextVar("moetune_poison", default=False)


@contextlib.contextmanager
def poisoned_workspace() -> Iterator[None]:
    """Fill the op's intermediate buffers with NaN before use, so an unwritten row shows.

    Not the fp32 buffer of :func:`sum_topk_in_gemm2`: atomic adds need it zeroed, so a slot left
    unwritten there shows as a wrong value in the reference check instead of as NaN."""
    token = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(token)


_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "moetune_capture", default=None
)


@contextlib.contextmanager
def capture_requantized() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect ``(a2, a2_scale)``, the activation each w8a8 call re-quantized for GEMM2, so a
    check can judge the op against the reference given that operand
    (:meth:`moetune.reference.Reference.matching`). Never active while timing."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    token = _CAPTURE.set(seen)
    try:
        yield seen
    finally:
        _CAPTURE.reset(token)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _POISON.get():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _resolve_configs(
    config: dict[str, Any] | None,
    config_down: dict[str, Any] | None,
    M: int,
    E: int,
    N: int,
    K: int,
    topk: int,
    dtype: torch.dtype,
    quant: str | None,
    block_shape: tuple[int, int] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (up, down) GEMMs' configs: a given ``config`` serves both unless ``config_down`` is
    given too; without ``config`` each GEMM's table is looked up (the down one falls back to the
    up one's)."""
    if config is not None:
        return config, config_down if config_down is not None else config
    from moetune import lookup  # the tuned tables; imported late to keep import light

    def find(gemm: str) -> dict[str, Any]:
        return lookup.config_for(M, E, N, K, topk, dtype=dtype, quant=quant,
                                 block_shape=block_shape, gemm=gemm)  # fmt: skip

    return find("up"), config_down if config_down is not None else find("down")


def fuse_gemm1(M: int, static_fp8: bool) -> bool:
    """Whether the op applies the activation in GEMM1's epilogue for ``M`` tokens (the same
    answer in compile processes, so they build the kernel the op launches)."""
    if not FUSE_GEMM1_ACTIVATION:
        return False
    limit = FUSE_GEMM1_STATIC_FP8_MAX_M
    return not static_fp8 or limit is None or limit >= M


def gemm1_dependent(direct: bool, quantized: bool) -> bool:
    """Whether GEMM1 launches as a programmatic dependent (:data:`moetune.launch.PDL_GEMM1`):
    where the kernel ahead of it is the op's own, the routing launch (no ``direct`` slots) or the
    input's quantization (``quantized``). The same answer in compile processes, where those
    steps run in PyTorch: the launch flag is part of the compiled kernel."""
    return launch.PDL_GEMM1 and (not direct or quantized)


def sorted_auto(
    M: int, topk: int, *, quant: str | None, same_block_m: bool, tma: Callable[[], bool]
) -> bool:
    """Whether :data:`SORTED_AUTO_MIN_M`'s rule puts both GEMMs' inputs in sorted positions for
    ``M`` tokens: no quantization (``quant`` None, weights included), top-k at most
    :data:`SORTED_AUTO_MAX_TOPK`, up and down tiles of one height, and sorted rows through TMA
    (``tma()``, e.g. :func:`moetune.launch.sorted_rows_tma`: asked last, as it may ask the
    device)."""
    limit = SORTED_AUTO_MIN_M
    return (limit is not None and limit <= M and topk <= SORTED_AUTO_MAX_TOPK and quant is None
            and same_block_m and tma())  # fmt: skip


def sorted_rows(
    M: int,
    *,
    direct: bool,
    same_block_m: bool,
    quantized: bool,
    static_tensor_scale: bool,
    per_channel: bool,
    block: bool,
    topk: int,
    quant: str | None,
    tma: Callable[[], bool],
) -> tuple[bool, bool]:
    """Whether GEMM1 reads its input gathered into sorted positions, and whether GEMM1's output
    (GEMM2's input) lies in sorted positions (:data:`SORTED_INPUT_MIN_M`,
    :data:`SORTED_MIN_M`, or both by :func:`sorted_auto`'s rule for ``topk``, ``quant`` and
    ``tma``), for ``M`` tokens. The same answers in compile processes."""
    if direct:
        return False, False
    auto = sorted_auto(M, topk, quant=quant, same_block_m=same_block_m, tma=tma)
    sorted_in = auto or (SORTED_INPUT_MIN_M is not None and M >= SORTED_INPUT_MIN_M)
    per_row_safe = not quantized or block or (static_tensor_scale and not per_channel)
    sorted_mid = auto or (SORTED_MIN_M is not None and M >= SORTED_MIN_M and same_block_m
                          and per_row_safe)  # fmt: skip
    return sorted_in, sorted_mid


def sum_topk_in_gemm2(M: int, topk: int) -> bool:
    """Whether the op sums over top-k in GEMM2's epilogue for ``M`` tokens (compile processes
    follow it too). Never for ``topk == 1``: there is nothing to sum, and fp32 atomics into a
    zeroed buffer plus a cast would cost more than today's store."""
    limit = SUM_TOPK_IN_GEMM2_MIN_M
    return topk > 1 and limit is not None and limit <= M


def fused_experts(
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
) -> torch.Tensor:
    """The MoE layer on routed tokens: ``Σ_slot w_route · (act(x·w1ᵀ + b1)·w2ᵀ + b2)``.

    Shapes: ``hidden_states [M, K]``, ``w1 [E, 2N, K]``, ``w2 [E, K, N]``, ``topk_weights`` and
    ``topk_ids [M, topk]``. ``config`` is one vLLM table entry used for both GEMMs; None looks up
    the tuned tables, then the heuristic default. ``expert_map`` (global id → local id or -1)
    makes experts of other ranks contribute zero, as in expert parallelism.
    """
    args = validate_moe_args(
        hidden_states, w1, w2, topk_weights, topk_ids,
        activation=activation, w1_bias=w1_bias, w2_bias=w2_bias, quant=quant,
        w1_scale=w1_scale, w2_scale=w2_scale, a1_scale=a1_scale, a2_scale=a2_scale,
        per_channel_quant=per_channel_quant, block_shape=block_shape, expert_map=expert_map,
    )  # fmt: skip
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    block = args.block_shape
    M, K = hidden_states.shape
    E, two_n, _ = w1.shape
    N = two_n // 2
    topk = topk_ids.shape[1]
    dtype = hidden_states.dtype
    device = hidden_states.device
    num_slots = M * topk
    config, config_down = _resolve_configs(
        config, config_down, M, E, N, K, topk, dtype, quant, block
    )
    # Compile processes (launch.compile_only) need only the GEMMs' shapes and strides, from CPU
    # tensors: the other steps run in PyTorch there.
    align, activate, quantize = (
        (moe_align_block_size_torch, apply_activation_torch, quantize_activation_torch)
        if compiling()
        else (moe_align_block_size, apply_activation, quantize_activation)
    )
    qdtype = None
    if quant in ("fp8_w8a8", "int8_w8a8"):
        qdtype = w1.dtype
    group_k = block[1] if block is not None else None
    # direct_slots is a run-time argument of the GEMM kernel: compile processes, which build at
    # 16 tokens, build the kernel this path launches too (int32 ids, see align.direct_slots).
    direct = expert_map is None and DIRECT_SLOTS_MAX_M is not None and 1 <= M <= DIRECT_SLOTS_MAX_M
    routed = None
    if (QUANTIZE_IN_ROUTING and not direct and not compiling() and qdtype in FP8_DTYPES
            and a1_scale is not None and not per_channel_quant and group_k is None):  # fmt: skip
        routed = align_and_quantize(topk_ids, config["BLOCK_SIZE_M"], args.global_num_experts,
                                    expert_map, hidden_states, a1_scale, qdtype)  # fmt: skip
    if routed is not None:
        routing, a1 = routed
        a1s = static_scale(a1_scale, M).contiguous()
    else:
        if direct:
            routing = direct_slots(topk_ids)
        else:
            routing = align(topk_ids, config["BLOCK_SIZE_M"], args.global_num_experts, expert_map)
        a1, a1s = hidden_states, None
        if qdtype is not None:
            a1, a1s = quantize(
                hidden_states, qdtype, scale=a1_scale, per_token=per_channel_quant,
                group_k=group_k,
            )  # fmt: skip
    routing_down = routing
    if not direct and config_down["BLOCK_SIZE_M"] != config["BLOCK_SIZE_M"]:
        # The padding of each expert's slots follows BLOCK_SIZE_M: another M tile needs its own.
        routing_down = align(
            topk_ids, config_down["BLOCK_SIZE_M"], args.global_num_experts, expert_map
        )
    common = dict(compute_dtype=dtype, quant=quant, per_channel=per_channel_quant,
                  block_shape=block)  # fmt: skip
    static_fp8 = qdtype in FP8_DTYPES and a2_scale is not None and group_k is None
    sorted_in, sorted_mid = sorted_rows(
        M, direct=direct, same_block_m=routing_down is routing, quantized=qdtype is not None,
        static_tensor_scale=a2_scale is not None and a2_scale.numel() == 1,
        per_channel=per_channel_quant, block=group_k is not None, topk=topk, quant=quant,
        tma=lambda: launch.sorted_rows_tma(device, config["BLOCK_SIZE_M"],
                                           (K * dtype.itemsize, N * dtype.itemsize)),
    )  # fmt: skip
    if sorted_in:  # GEMM1's input (and its per-row scales) at the sorted positions
        gather = (
            gather_sorted_torch
            if compiling()
            else lambda x, *r: gather_sorted(x, *r, signal=launch.signal_gemm1(device))
        )
        a1 = gather(a1, routing, topk, num_slots)
        if a1s is not None and a1s.dim() == 2:
            a1s = gather(a1s, routing, topk, num_slots)
    # GEMM1's output rows: one a slot, or the sorted positions (GEMM2 reads contiguous blocks).
    rows1 = routing.sorted_token_ids.numel() if sorted_mid else num_slots
    layout1 = dict(sorted_in=sorted_in, num_slots=num_slots if sorted_in else None,
                   sorted_out=sorted_mid)  # fmt: skip
    # The steps between the GEMMs skip sorted positions that hold no slot (the bound EM may be
    # several times the slots: gpt-oss at M=2048, 24,448 rows for 8,192 slots).
    live_kw = {}
    if sorted_mid and not compiling():
        live_kw["live"] = LiveRows(
            routing.sorted_token_ids, routing.num_tokens_post_padded, num_slots
        )

    gemm1 = dict(routing=routing, config=config, top_k=topk, a_scale=a1s, b_scale=w1_scale,
                 bias=w1_bias, dependent=gemm1_dependent(direct, qdtype is not None),
                 **layout1, **common)  # fmt: skip
    # Compile processes take the fused paths too: they must compile the kernel the op runs.
    fuse = fuse_gemm1(M, static_fp8)
    if fuse and static_fp8:
        a2s = static_scale(a2_scale, num_slots).contiguous()
        a2 = _empty((rows1, N), qdtype, device)
        invoke_moe_gemm(a1, w1, a2, activation=activation, out_scale=a2s, **gemm1)
    elif FUSE_ACTIVATION_QUANT and static_fp8 and not compiling():
        cache1 = _empty((rows1, two_n), dtype, device)
        invoke_moe_gemm(a1, w1, cache1, **gemm1)
        a2, a2s = apply_activation_quantized(cache1, activation, qdtype, a2_scale, **live_kw)
    else:
        if fuse:
            h = _empty((rows1, N), dtype, device)
            invoke_moe_gemm(a1, w1, h, activation=activation, **gemm1)
        else:
            cache1 = _empty((rows1, two_n), dtype, device)
            invoke_moe_gemm(a1, w1, cache1, **gemm1)
            h = activate(cache1, activation, **live_kw)
        a2, a2s = h, None
        if qdtype is not None:
            a2, a2s = quantize(
                h, qdtype, scale=a2_scale, per_token=per_channel_quant, group_k=group_k,
                **(live_kw if group_k is not None else {}),
            )  # fmt: skip
    seen = _CAPTURE.get()
    if seen is not None and a2s is not None:
        seen.append(_slot_rows(a2, a2s, routing, num_slots) if sorted_mid else (a2, a2s))
    # GEMM2 follows a kernel of the op's own (GEMM1, the activation, a quantization, or the fill
    # of the zeros below): with launch.PDL it may start while that one finishes.
    gemm2 = dict(config=config_down, top_k=1, a_scale=a2s, b_scale=w2_scale, bias=w2_bias,
                 topk_weights=topk_weights.reshape(-1).float(), dependent=True, down=True,
                 sorted_in=sorted_mid, num_slots=num_slots if sorted_mid else None,
                 **common)  # fmt: skip
    if sum_topk_in_gemm2(M, topk):
        # Zeros, never the poison: the slots are added into it (see poisoned_workspace).
        out = torch.zeros((M, K), dtype=torch.float32, device=device)
        invoke_moe_gemm(a2, w2, out, routing_down, sum_topk=topk, **gemm2)
        return out.to(dtype)  # one cast, as torch's sum of the cache casts its fp32 total
    cache3 = _empty((num_slots, K), dtype, device)
    invoke_moe_gemm(a2, w2, cache3, routing_down, **gemm2)
    if topk == 1:  # nothing to sum: the slot rows are the token rows
        return cache3
    if TOPK_SUM_KERNEL and not compiling():
        return topk_sum(cache3, topk)
    return cache3.view(M, topk, K).sum(dim=1)


def _slot_rows(
    a2: torch.Tensor, a2s: torch.Tensor, routing: RoutingBlocks, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM2's input and its scales from sorted positions back to one row a slot (for
    :func:`capture_requantized`: checks only, never timed)."""
    ids = routing.sorted_token_ids.to(torch.int64)
    keep = LiveRows(ids, routing.num_tokens_post_padded, num_slots).mask()

    def unsort(t: torch.Tensor) -> torch.Tensor:
        out = _empty((num_slots, t.shape[1]), t.dtype, t.device)
        bits = (lambda x: x.view(torch.uint8)) if t.element_size() == 1 else (lambda x: x)
        bits(out)[ids[keep]] = bits(t)[keep]  # fp8 copied as bytes
        return out

    if a2s.dim() == 2 and a2s.shape[0] == a2.shape[0]:
        a2s = unsort(a2s)
    return unsort(a2), a2s


def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """Softmax top-k routing from ``gating_output [M, E]``, then :func:`fused_experts`."""
    topk_weights, topk_ids = softmax_topk(gating_output, topk, renormalize)
    return fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, **kwargs)


def softmax_topk(
    gating_output: torch.Tensor, topk: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: fp32 softmax over experts, the ``topk`` largest, optionally renormalized to sum 1."""
    if gating_output.dim() != 2:
        raise ValueError(f"gating_output must be [M, E], got shape {tuple(gating_output.shape)}")
    if not 1 <= topk <= gating_output.shape[1]:
        raise ValueError(f"topk must be in [1, {gating_output.shape[1]}], got {topk}")
    probs = torch.softmax(gating_output.float(), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


__all__ = [
    "capture_requantized",
    "fused_experts",
    "fused_moe",
    "poisoned_workspace",
]
