"""The fused MoE GEMM: one Triton kernel for both projections of the MoE op.

Each program computes a ``BLOCK_SIZE_M × BLOCK_SIZE_N`` tile of ``C[token] = A[token // top_k] ·
B[expert]ᵀ`` over a block of expert-sorted token slots (see ``moetune.align``), then applies the
epilogue in DESIGN §1's order: fp32 dequantization → + bias → × router weight → one cast.

For the up projection the epilogue can go on (``ACTIVATION``): the tile's B rows are chosen so
that it holds the gate and up columns of ``BLOCK_SIZE_N / 2`` outputs (for ``silu``'s stacked
halves the first half of the tile gate and the second up, or with ``SILU_PAIRS`` gate and up rows
interleaved; ``swigluoai``'s weights are interleaved already),
the cast value is taken back to fp32, the activation applied, cast again, and optionally
quantized to fp8 with a static scale (``QUANT_OUT``). Those are the bits of GEMM1 → activation
kernel → quantization, without the ``[slots, 2N]`` intermediate in memory or its launch.

For the down projection the epilogue can also sum over top-k (``SUM_TOPK = k``): each slot's row,
cast to the compute dtype as a store would cast it, is taken back to fp32 and added atomically to
its token's row ``slot // k`` of an fp32 ``C`` that starts at zero; the caller casts ``C`` once.
Those are the bits of storing ``[slots, N]`` and summing it in fp32 (as torch's sum does), up to
the order of the fp32 additions, without that intermediate or the reduce kernel.

B's tiles come through pointer loads, or with ``B_TMA`` through a TMA descriptor (Hopper's bulk
copies; ``moetune.launch.weights_tma`` decides): silu's gate and up rows then load as two half
tiles into two accumulators, joined into ``SILU_PAIRS``'s column pairs after the K loop.
"""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split

import triton
import triton.language as tl

from moetune.activation import silu_mul, swiglu_oai
from moetune.quant_kernel import quantize_fp8


# EM and num_valid_tokens change with the batch size, direct_slots with the routing: not
# specializing on them lets one compiled kernel serve every batch size of a sweep (and of a
# server).
@triton.jit(do_not_specialize=["EM", "num_valid_tokens", "direct_slots"])
def fused_moe_kernel(
    # Pointers
    a_ptr,  # [T_a, K]        activations: compute dtype, or fp8/int8 for w8a8 ([EM, K], A_SORTED)
    b_ptr,  # [E, N, K]       weights: compute dtype, fp8 or int8
    b_desc,  # B_TMA: a TMA descriptor of b viewed as [E * N, K]; else unused (None)
    a_desc,  # A_TMA: a TMA descriptor of a ([EM, K], A_SORTED's rows); else unused (None)
    c_ptr,  # [T_c, N] output rows, one per routed slot ([EM, ...], C_SORTED); [T_c, N / 2] after
    # ACTIVATION (compute dtype, or fp8 with QUANT_OUT); [T_c / SUM_TOPK, N] fp32 with SUM_TOPK
    bias_ptr,  # [E, N]       optional, any float dtype
    a_scale_ptr,  # [1] per tensor | [T_a, 1] per token | [T_a, ceil(K/group_k)] per block
    b_scale_ptr,  # [E] per tensor | [E, N] per channel | [E, ceil(N/group_n), ceil(K/group_k)]
    topk_weights_ptr,  # [num_valid_tokens] float32 router weights, flattened [M, top_k]
    sorted_token_ids_ptr,  # [EM] int32: slot ids grouped by expert, padded with num_valid_tokens
    expert_ids_ptr,  # [EM / BLOCK_SIZE_M] int32: expert of each M-block, -1 = not on this rank
    num_tokens_post_padded_ptr,  # [1] int32: used length of sorted_token_ids
    out_scale_ptr,  # QUANT_OUT: static scale of the activation, [1], or [T_c] per row
    alpha,  # swigluoai's constants
    limit,
    qmax,  # QUANT_OUT: the fp8 format's largest value
    # Sizes
    N,
    K,
    EM,
    num_valid_tokens,
    # 1: no routing blocks (moetune.align.DirectSlots): block b is slot b alone, its expert
    # expert_ids_ptr[b] (the flat int32 topk_ids); sorted_token_ids_ptr and
    # num_tokens_post_padded_ptr are unused, EM is num_valid_tokens * BLOCK_SIZE_M. A run-time
    # argument (not specialized), so one compiled kernel serves both routings.
    direct_slots,
    # Strides
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    stride_biase,
    stride_biasn,
    # Meta-parameters
    group_n: tl.constexpr,  # block-quantization group sizes; 0 when not block-quantized
    group_k: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    top_k: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    use_fp8_w8a8: tl.constexpr,
    use_int8_w8a8: tl.constexpr,
    use_int8_w8a16: tl.constexpr,
    per_channel_quant: tl.constexpr,
    compute_type: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_MAX_IMPRECISE_ACC: tl.constexpr,  # 0: fp32 accumulation; None: Hopper's fast fp8 mode
    ACTIVATION: tl.constexpr = 0,  # 0: none; 1: silu (gate | up halves); 2: swigluoai (pairs)
    # silu: load gate and up rows interleaved, so the tile holds (gate, up) column pairs as
    # swigluoai's does and the epilogue splits them in registers instead of permuting the tile.
    SILU_PAIRS: tl.constexpr = False,
    QUANT_OUT: tl.constexpr = False,
    PER_ROW_SCALE: tl.constexpr = False,
    MIN_EXP: tl.constexpr = -6,  # QUANT_OUT: the fp8 format's smallest normal exponent
    # k > 0 (ACTIVATION 0 only): atomically add slot rows into token rows slot // k of an fp32 c
    # instead of storing them. Its own parameter: GEMM2 runs with top_k = 1 (its A rows are slots).
    SUM_TOPK: tl.constexpr = 0,
    # Load B's tiles through b_desc (Hopper's TMA) instead of pointers. Its blocks are
    # [BLOCK_SIZE_N, BLOCK_SIZE_K] rows of the [E * N, K] view, or with silu [BLOCK_SIZE_N / 2,
    # BLOCK_SIZE_K]: the gate and up halves load as two tiles into two accumulators, joined into
    # SILU_PAIRS's column pairs after the loop (the launcher sets SILU_PAIRS with it).
    B_TMA: tl.constexpr = False,
    # Block quantization: every column of the tile (of each half, with B_TMA's silu halves) lies
    # in one N-group of the weight scales, so each K step loads one weight scale, not a vector
    # of BLOCK_SIZE_N gathered ones (the launcher decides, moetune.launch.block_scale_per_tile).
    B_SCALE_PER_TILE: tl.constexpr = False,
    # A's rows are the routing's sorted positions ([EM, K]: row i holds sorted slot i, padded rows
    # anything), not token rows gathered through sorted_token_ids: a block's rows are contiguous.
    # Per-row scales of A (per-token, block) are then indexed by sorted position too.
    A_SORTED: tl.constexpr = False,
    A_TMA: tl.constexpr = False,  # A_SORTED's tiles through a_desc (Hopper's TMA)
    # C's rows are the routing's sorted positions ([EM, N]): GEMM1's, so that GEMM2 reads them
    # with A_SORTED. Padded rows are left as they were. Not with SUM_TOPK.
    C_SORTED: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,  # launched as a programmatic dependent (launch.PDL)
    PDL_LATE_TRIGGER: tl.constexpr = False,  # dependents may launch after the K loop, not before
):
    """Grid: ``(cdiv(EM, BLOCK_SIZE_M) * cdiv(N, BLOCK_SIZE_N),)``.

    ``EM`` is a static upper bound on the padded slot count, so the launch needs no host
    synchronisation; programs past ``num_tokens_post_padded`` return at once.
    """
    # Grouped ordering of the tiles, so programs that share B columns run close in time.
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    if USE_PDL:  # (let the next launch start, then) wait for the previous one's memory
        if not PDL_LATE_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    if direct_slots == 0:  # noqa: SIM102 (one condition a run-time value, the other a load)
        if pid_m * BLOCK_SIZE_M >= tl.load(num_tokens_post_padded_ptr):
            return
    offs_token_id = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    if direct_slots != 0:
        # One slot a block, no routing launch: row 0 holds slot pid_m, the others are padding,
        # and the block's expert is that slot's routing id (expert_ids_ptr: the flat topk_ids).
        rows = tl.arange(0, BLOCK_SIZE_M)
        offs_token = tl.where(rows == 0, pid_m, num_valid_tokens).to(tl.int64)
        off_expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    else:
        offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
        off_expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    if ACTIVATION == 0:
        offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
        c_mask = token_mask[:, None] & (offs_cn[None, :] < N)
        # Columns wrap modulo N so the loads need no N mask; the store masks them.
        offs_bn = offs_cn % N
    else:
        # BLOCK_SIZE_N / 2 outputs; the tile's columns are their gate and up rows of B.
        offs_cn = pid_n * (BLOCK_SIZE_N // 2) + tl.arange(0, BLOCK_SIZE_N // 2).to(tl.int64)
        c_mask = token_mask[:, None] & (offs_cn[None, :] < N // 2)
        cols = tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
        if ACTIVATION == 1 and SILU_PAIRS:  # column 2j: gate row of output j, 2j+1: its up row
            out_col = pid_n * (BLOCK_SIZE_N // 2) + cols // 2
            offs_bn = out_col % (N // 2) + (cols % 2) * (N // 2)
        elif ACTIVATION == 1:  # gate rows [0, N/2), up rows [N/2, N)
            half = cols // (BLOCK_SIZE_N // 2)
            out_col = pid_n * (BLOCK_SIZE_N // 2) + cols % (BLOCK_SIZE_N // 2)
            offs_bn = out_col % (N // 2) + half * (N // 2)
        else:  # gate and up interleaved: the tile's columns are contiguous rows of B
            offs_bn = (pid_n * BLOCK_SIZE_N + cols) % N
    # Padded slots (num_valid_tokens) map past the last token row under SUM_TOPK too: masked.
    if C_SORTED:
        c_rows = offs_token_id
    elif SUM_TOPK > 0:
        c_rows = offs_token // SUM_TOPK
    else:
        c_rows = offs_token
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_cn[None, :] * stride_cn

    if off_expert == -1:
        # The expert lives on another rank: its slots contribute zero here (as does the
        # activation of zero); under SUM_TOPK, nothing to add to c's zeros.
        if SUM_TOPK > 0:
            return
        if ACTIVATION == 0:
            zero = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        else:
            zero = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N // 2), dtype=tl.float32)
        tl.store(c_ptrs, zero.to(c_ptr.dtype.element_ty), mask=c_mask)
        return
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_rows = offs_token_id if A_SORTED else offs_token // top_k
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (
        b_ptr + off_expert * stride_be + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    )

    a_scale_ptrs = a_scale_ptr  # block quantization's per-K-group scale rows (set below)
    b_scale_ptrs = b_scale_ptr
    if use_int8_w8a16:
        b_scale = tl.load(b_scale_ptr + off_expert * stride_bse + offs_bn * stride_bsn)
    if use_fp8_w8a8 or use_int8_w8a8:
        if per_channel_quant:
            a_scale = tl.load(a_scale_ptr + a_rows * stride_asm, mask=token_mask, other=0.0)
            b_scale = tl.load(b_scale_ptr + off_expert * stride_bse + offs_bn * stride_bsn)
        elif group_k > 0:
            a_scale_ptrs = a_scale_ptr + a_rows * stride_asm
            if B_SCALE_PER_TILE:  # the group of the tile's first column (HALVES: set below)
                b_group = (pid_n * BLOCK_SIZE_N) // group_n
                b_scale_ptrs = b_scale_ptr + off_expert * stride_bse + b_group * stride_bsn
            else:
                b_scale_ptrs = (
                    b_scale_ptr + off_expert * stride_bse + (offs_bn // group_n) * stride_bsn
                )
        else:
            a_scale = tl.load(a_scale_ptr)
            b_scale = tl.load(b_scale_ptr + off_expert)

    # With silu under B_TMA the gate and up halves accumulate apart: TILE_N columns each.
    HALVES: tl.constexpr = B_TMA and ACTIVATION == 1
    TILE_N: tl.constexpr = BLOCK_SIZE_N // 2 if HALVES else BLOCK_SIZE_N
    acc_dtype = tl.int32 if use_int8_w8a8 and group_k == 0 else tl.float32
    accumulator = tl.zeros((BLOCK_SIZE_M, TILE_N), dtype=acc_dtype)
    if B_TMA:
        # Row of the [E * N, K] view where this tile's B rows start. A tile past its rows
        # (N's tail) reads on into the next rows: silu's gate half into the same expert's up
        # rows, other tiles into the next expert's, or zeros past the last: those columns are
        # masked at the store, as the pointer loads' wrapped columns are.
        b_row = (off_expert * N).to(tl.int32) + pid_n * TILE_N
        if HALVES:
            up_accumulator = tl.zeros((BLOCK_SIZE_M, TILE_N), dtype=acc_dtype)
            half_cols = (pid_n * TILE_N + tl.arange(0, TILE_N).to(tl.int64)) % (N // 2)
            b_scale_ptrs_up = b_scale_ptr + off_expert * stride_bse
            if group_k > 0 and B_SCALE_PER_TILE:
                first = (pid_n * TILE_N) % (N // 2)  # the halves' first output column
                b_scale_ptrs = b_scale_ptrs_up + (first // group_n) * stride_bsn
                b_scale_ptrs_up += ((first + N // 2) // group_n) * stride_bsn
            elif group_k > 0:
                b_scale_ptrs = b_scale_ptrs_up + (half_cols // group_n) * stride_bsn
                b_scale_ptrs_up += ((half_cols + N // 2) // group_n) * stride_bsn

    a_row = (pid_m * BLOCK_SIZE_M).to(tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_remaining = K - k * BLOCK_SIZE_K
        if A_TMA:  # padded rows load whatever the rows hold; their outputs are masked
            a = a_desc.load([a_row, k * BLOCK_SIZE_K])
        else:
            a = tl.load(
                a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0
            )
        if B_TMA:  # TMA fills the K tail with zeros
            b = b_desc.load([b_row, k * BLOCK_SIZE_K]).T
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        accumulator = _dot_step(
            accumulator, a, b, k, a_scale_ptrs, b_scale_ptrs, token_mask, stride_ask, stride_bsk,
            group_k, BLOCK_SIZE_K, use_fp8_w8a8, use_int8_w8a8, use_int8_w8a16, compute_type,
            DOT_PRECISION, FP8_MAX_IMPRECISE_ACC, B_SCALE_PER_TILE,
        )  # fmt: skip
        if HALVES:
            b_up = b_desc.load([b_row + N // 2, k * BLOCK_SIZE_K]).T
            up_accumulator = _dot_step(
                up_accumulator, a, b_up, k, a_scale_ptrs, b_scale_ptrs_up, token_mask,
                stride_ask, stride_bsk, group_k, BLOCK_SIZE_K, use_fp8_w8a8, use_int8_w8a8,
                use_int8_w8a16, compute_type, DOT_PRECISION, FP8_MAX_IMPRECISE_ACC,
                B_SCALE_PER_TILE,
            )  # fmt: skip
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    if USE_PDL and PDL_LATE_TRIGGER:  # the next launch may start once every program is here
        tl.extra.cuda.gdc_launch_dependents()
    if HALVES:  # column 2j: gate of output j, 2j+1: its up (SILU_PAIRS's tile)
        accumulator = tl.reshape(tl.join(accumulator, up_accumulator), (BLOCK_SIZE_M, BLOCK_SIZE_N))

    # Epilogue, DESIGN §1: dequantize in fp32, then bias, then router weight, then one cast.
    acc = accumulator.to(tl.float32)
    if use_int8_w8a16:
        acc = acc * b_scale[None, :]
    elif use_fp8_w8a8 or use_int8_w8a8:
        if per_channel_quant:
            acc = acc * a_scale[:, None] * b_scale[None, :]
        elif group_k == 0:
            acc = acc * a_scale * b_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + off_expert * stride_biase + offs_bn * stride_biasn)
        acc = acc + bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        route_w = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        acc = acc * route_w.to(tl.float32)[:, None]
    if ACTIVATION == 0 and SUM_TOPK > 0:
        # The value a store would write, summed in fp32 as torch sums the stored rows. Atomics
        # add in any order: two addends give torch's bits (fp32 + commutes), more may differ in
        # fp32's last place, and from run to run on a GPU.
        out = acc.to(compute_type).to(tl.float32)
        tl.atomic_add(c_ptrs, out, mask=c_mask, sem="relaxed")
    elif ACTIVATION == 0:
        tl.store(c_ptrs, acc.to(compute_type), mask=c_mask)
    else:
        # GEMM1's output as the unfused op stores it, then the activation kernel's arithmetic.
        h = acc.to(compute_type).to(tl.float32)
        if ACTIVATION == 1 and not SILU_PAIRS:
            h = tl.permute(tl.reshape(h, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N // 2)), (0, 2, 1))
            gate, up = tl.split(h)
            out = silu_mul(gate, up)
        else:
            gate, up = tl.split(tl.reshape(h, (BLOCK_SIZE_M, BLOCK_SIZE_N // 2, 2)))
            if ACTIVATION == 1:  # noqa: SIM108 (one branch compiled)
                out = silu_mul(gate, up)
            else:
                out = swiglu_oai(gate, up, alpha, limit)
        if QUANT_OUT:  # the activation as the op's dtype holds it, then the static fp8 step
            if PER_ROW_SCALE:
                scale = tl.load(out_scale_ptr + offs_token, mask=token_mask, other=1.0)
                scale = tl.broadcast_to(scale[:, None], (BLOCK_SIZE_M, BLOCK_SIZE_N // 2))
            else:
                scale = tl.load(out_scale_ptr)
            out = out.to(compute_type).to(tl.float32)
            out = quantize_fp8(out, scale, qmax, MIN_EXP)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _dot_step(
    acc,
    a,
    b,
    k,
    a_scale_ptrs,
    b_scale_ptrs,
    token_mask,
    stride_ask,
    stride_bsk,
    group_k: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    use_fp8_w8a8: tl.constexpr,
    use_int8_w8a8: tl.constexpr,
    use_int8_w8a16: tl.constexpr,
    compute_type: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_MAX_IMPRECISE_ACC: tl.constexpr,
    B_SCALE_PER_TILE: tl.constexpr,
):
    """``acc`` plus one K tile's ``a · b`` in the quantization's arithmetic."""
    if use_int8_w8a16:
        acc = tl.dot(a, b.to(compute_type), acc=acc)
    elif (use_fp8_w8a8 or use_int8_w8a8) and group_k > 0:
        # Block quantization: one scale per (token, K-group) and (N-group, K-group); a K tile
        # never straddles two groups (BLOCK_SIZE_K divides group_k, checked by the launcher).
        k_group = (k * BLOCK_SIZE_K) // group_k
        a_s = tl.load(a_scale_ptrs + k_group * stride_ask, mask=token_mask, other=0.0)
        b_s = tl.load(b_scale_ptrs + k_group * stride_bsk)
        if use_int8_w8a8:
            partial = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        else:
            partial = tl.dot(a, b, max_num_imprecise_acc=FP8_MAX_IMPRECISE_ACC)
        # One scale per element, a_s · b_s, then one multiply-add: the same bits whether b_s
        # is the tile's one weight scale or a vector of them.
        if B_SCALE_PER_TILE:
            acc += partial * (a_s * b_s)[:, None]
        else:
            acc += partial * (a_s[:, None] * b_s[None, :])
    elif use_int8_w8a8:
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
    elif use_fp8_w8a8:
        acc = tl.dot(a, b, acc=acc, max_num_imprecise_acc=FP8_MAX_IMPRECISE_ACC)
    else:
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
    return acc
