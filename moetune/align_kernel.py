"""Routing metadata in Triton (one launch at decode sizes, two kernels beyond) instead of ~30
small PyTorch launches.

At decode batch sizes the GEMMs read a few MB of weights in ~10 µs, so every extra launch in the
op shows up in its time: the PyTorch version of ``moe_align_block_size`` (bincount, two cumsums,
a sort, scatters, a searchsorted, ...) was most of the op at M=1. Here:

1. ``_count_kernel`` (one program per CHUNK slots): a histogram of the chunk's expert ids added
   into ``counts`` with one atomic per expert; the same programs fill ``sorted_token_ids`` with
   the padding id ``num_slots``.
2. ``_place_kernel``: every program recomputes the padded offsets from ``counts`` (E ≤ a few
   hundred: cheaper than a third launch), takes a rank within its expert from an atomic counter
   and writes each slot id at ``padded_start[expert] + rank``; it also writes ``expert_ids`` of
   its range of blocks and the used length.

Slots of one expert come out in the order the atomics grant, not in token order; each row of a
block is computed on its own, so outputs do not depend on that order. Plus one ``torch.zeros``
for the counters: three launches in all, none of which syncs with the host.

With ``ranked`` (RANKED_DEFAULT) the slots past one program take two launches instead, no
counters to zero: ``_chunk_count_kernel`` writes each chunk's histogram as a row of
``chunk_counts``, and ``_chunk_place_kernel`` sums the rows (each expert's count, and its count
in earlier chunks) and ranks its chunk's slots by a sort, so slots keep token order.

Up to ONE_PROGRAM_SLOTS slots (decode: M ≤ 32 at top-8) ``_one_program_kernel`` can do it all
in one launch and one program (the op's default: see ONE_PROGRAM_DEFAULT): a histogram,
the padded offsets, a sort of (expert, slot) keys that gives each slot its rank within its
expert (token order, as the PyTorch version), the padding ids written first and the slots
after a barrier, and each used block's expert written by the slot that starts it. No counters
to zero, so one launch instead of three.

``align_and_quantize`` adds the static per-tensor fp8 quantization of the op's input to that
launch: more programs, each quantizing a piece of the input while program 0 routes, so decode
pays one launch for both steps.
"""

from __future__ import annotations

import moetune._interpret  # noqa: F401  (must run before triton is imported)

# isort: split
import torch
import triton
import triton.language as tl

from moetune.align import RoutingBlocks, max_padded_slots
from moetune.launch import signal_gemm1
from moetune.quant import FP8_DTYPES, quant_max
from moetune.quant_kernel import COLS, fp8_min_exp, quantize_fp8

ONE_PROGRAM_SLOTS = 256  # up to this many slots: one launch, one program
# 3 to 6 µs faster than three launches at every decode point timed on an NVIDIA H200
# (results/kernels/NOTES.md §8); ``one_program=False`` asks for the three launches.
ONE_PROGRAM_DEFAULT = True
# Past ONE_PROGRAM_SLOTS: two launches that rank slots by sorting chunks of RANK_CHUNK slots (no
# counters to zero, no atomics, token order within an expert), or three with atomic counters.
# On an H100, 3-5% faster for Qwen3-30B-A3B at M=128 and 512, and never slower at the 42 points
# timed (results/kernels/NOTES.md §27).
RANKED_DEFAULT = True
RANK_CHUNK = 256  # slots per program of the two-launch path
# Every program of the second launch reads every chunk's histogram, so its reads in all grow as
# chunks² x E_BINS: past RANKED_MAX_READS counts (Qwen3-30B-A3B's 128 chunks of 256 bins, i.e.
# 32,768 slots at M=4096; fewer chunks with more experts) the three launches take over.
RANKED_MAX_READS = 128 * 128 * 256
SLOT_CHUNK = 1024  # slots per program
FILL_CHUNK = 1024  # padding ids written per program
BLOCK_CHUNK = 32  # expert_ids entries per program


@triton.jit
def _count_kernel(
    ids_ptr, counts_ptr, sorted_ptr, num_slots, num_experts, max_padded,
    E_BINS: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    # Lanes past the end count into bin num_experts, which is never added.
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
    hist = tl.histogram(ids, E_BINS)
    bins = tl.arange(0, E_BINS)
    tl.atomic_add(counts_ptr + bins, hist, mask=(bins < num_experts) & (hist > 0))
    f = pid * FILL + tl.arange(0, FILL)
    tl.store(sorted_ptr + f, num_slots, mask=f < max_padded)


@triton.jit
def _place_kernel(
    ids_ptr, counts_ptr, cursor_ptr, sorted_ptr, expert_ids_ptr, total_ptr, map_ptr,
    num_slots, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, E_BINS: tl.constexpr, CHUNK: tl.constexpr, BLOCKS: tl.constexpr,
    HAS_MAP: tl.constexpr, SIGNAL: tl.constexpr = False,
):  # fmt: skip
    if SIGNAL:  # GEMM1, a programmatic dependent, may launch now (it waits for this one's memory)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    bins = tl.arange(0, E_BINS)
    counts = tl.load(counts_ptr + bins, mask=bins < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    total = tl.sum(padded, 0)

    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_slots
    ids = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
    rank = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
    pos = tl.gather(start, ids, 0) + rank
    tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=valid)

    # Block b belongs to the expert whose padded range holds b * BLOCK_M (searchsorted, right).
    b = pid * BLOCKS + tl.arange(0, BLOCKS)
    in_range = b < num_blocks
    first = b * BLOCK_M
    expert = tl.sum((end[None, :] <= first[:, None]).to(tl.int32), axis=1)
    expert = tl.minimum(expert, num_experts - 1)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=in_range, other=-1).to(tl.int32)
    expert = tl.where(first < total, expert, -1)
    tl.store(expert_ids_ptr + b, expert, mask=in_range)
    if pid == 0:
        tl.store(total_ptr, total)


@triton.jit
def _chunk_count_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, num_slots, num_experts, max_padded, num_chunks,
    E_BINS: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < num_chunks:  # row pid of chunk_counts: its chunk's histogram, every bin written
        offs = pid * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
        tl.store(chunk_counts_ptr + pid * E_BINS + tl.arange(0, E_BINS), tl.histogram(ids, E_BINS))
    f = pid * FILL + tl.arange(0, FILL)
    tl.store(sorted_ptr + f, num_slots, mask=f < max_padded)


@triton.jit
def _chunk_place_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, expert_ids_ptr, total_ptr, map_ptr,
    num_slots, num_experts, num_blocks, num_chunks,
    BLOCK_M: tl.constexpr, E_BINS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
    BLOCKS: tl.constexpr, HAS_MAP: tl.constexpr, SIGNAL: tl.constexpr = False,
):  # fmt: skip
    if SIGNAL:  # GEMM1, a programmatic dependent, may launch now (it waits for this one's memory)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    bins = tl.arange(0, E_BINS)
    # Each expert's count, and its count in the chunks before this program's: ROWS chunks' rows
    # of chunk_counts at a time.
    counts = tl.zeros([E_BINS], dtype=tl.int32)
    before = tl.zeros([E_BINS], dtype=tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        c = c0 + tl.arange(0, ROWS)
        rows = tl.load(chunk_counts_ptr + c[:, None] * E_BINS + bins[None, :],
                       mask=(c < num_chunks)[:, None], other=0)  # fmt: skip
        counts += tl.sum(rows, axis=0)
        before += tl.sum(tl.where((c < pid)[:, None], rows, 0), axis=0)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    total = tl.sum(padded, 0)

    if pid < num_chunks:
        # A slot's rank within its expert: the expert's slots in earlier chunks, plus its place
        # among the expert's slots of this chunk, from a sort of (expert, slot) keys. Token order,
        # as the PyTorch version's stable sort.
        s = tl.arange(0, CHUNK)
        offs = pid * CHUNK + s
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
        hist = tl.histogram(ids, E_BINS)
        hist_start = tl.cumsum(hist, 0) - hist
        key = tl.sort(ids * CHUNK + s, 0)
        expert = key // CHUNK
        real = expert < num_experts  # lanes past the end sort last
        e = tl.minimum(expert, num_experts - 1)
        rank = tl.gather(before, e, 0) + s - tl.gather(hist_start, e, 0)
        pos = tl.gather(start, e, 0) + rank
        tl.store(sorted_ptr + pos, pid * CHUNK + key % CHUNK, mask=real)

    # Block b belongs to the expert whose padded range holds b * BLOCK_M (searchsorted, right).
    b = pid * BLOCKS + tl.arange(0, BLOCKS)
    in_range = b < num_blocks
    first = b * BLOCK_M
    expert_b = tl.sum((end[None, :] <= first[:, None]).to(tl.int32), axis=1)
    expert_b = tl.minimum(expert_b, num_experts - 1)
    if HAS_MAP:
        expert_b = tl.load(map_ptr + expert_b, mask=in_range, other=-1).to(tl.int32)
    expert_b = tl.where(first < total, expert_b, -1)
    tl.store(expert_ids_ptr + b, expert_b, mask=in_range)
    if pid == 0:
        tl.store(total_ptr, total)


@triton.jit
def _one_program_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, map_ptr,
    num_slots, num_experts, max_padded, num_blocks,
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, qmax,
    BLOCK_M: tl.constexpr, E_BINS: tl.constexpr, SLOTS: tl.constexpr, FILL: tl.constexpr,
    HAS_MAP: tl.constexpr, QUANT: tl.constexpr = False, COLS: tl.constexpr = 1024,
    MIN_EXP: tl.constexpr = -6, SIGNAL: tl.constexpr = False,
):  # fmt: skip
    if SIGNAL:  # GEMM1, a programmatic dependent, may launch now (it waits for this one's memory)
        tl.extra.cuda.gdc_launch_dependents()
    if QUANT:
        pid = tl.program_id(0)
        if pid > 0:
            # Programs 1, 2, ...: one (row, COLS columns) piece of x each, quantized with the
            # static scale exactly as quant_kernel's launch does, while program 0 routes.
            n_col = tl.cdiv(K, COLS)
            row = ((pid - 1) // n_col).to(tl.int64)
            cols = ((pid - 1) % n_col) * COLS + tl.arange(0, COLS)
            mask = cols < K
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            y = quantize_fp8(x, tl.load(scale_ptr), qmax, MIN_EXP)
            tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
            return
    s = tl.arange(0, SLOTS)
    # Lanes past the end get expert num_experts: counted in a bin never used, sorted last.
    ids = tl.load(ids_ptr + s, mask=s < num_slots, other=num_experts).to(tl.int32)
    bins = tl.arange(0, E_BINS)
    counts = tl.where(bins < num_experts, tl.histogram(ids, E_BINS), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, 0) - padded
    count_start = tl.cumsum(counts, 0) - counts
    total = tl.sum(padded, 0)

    # Padding ids everywhere and -1 for unused blocks first; the slots overwrite after a barrier.
    for p0 in range(0, max_padded, FILL):
        p = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + p, num_slots, mask=p < max_padded)
    for b0 in range(0, num_blocks, FILL):
        b = b0 + tl.arange(0, FILL)
        tl.store(expert_ids_ptr + b, -1, mask=(b < num_blocks) & (b * BLOCK_M >= total))
    tl.debug_barrier()

    key = tl.sort(ids * SLOTS + s, 0)  # by expert, then by slot
    expert = key // SLOTS
    slot = key % SLOTS
    real = s < num_slots  # sorted position s holds a real slot (padding lanes sort last)
    e = tl.minimum(expert, num_experts - 1)
    rank = s - tl.gather(count_start, e, 0)
    pos = tl.gather(start, e, 0) + rank
    tl.store(sorted_ptr + pos, slot, mask=real)
    # Every used block starts with a real slot (an expert pads fewer than BLOCK_M at its end).
    name = e
    if HAS_MAP:
        name = tl.load(map_ptr + e, mask=real, other=-1).to(tl.int32)
    tl.store(expert_ids_ptr + pos // BLOCK_M, name, mask=real & (rank % BLOCK_M == 0))
    tl.store(total_ptr, total)


def align_and_quantize(
    topk_ids: torch.Tensor,
    block_m: int,
    num_experts: int,
    expert_map: torch.Tensor | None,
    x: torch.Tensor,
    scale: torch.Tensor,
    qdtype: torch.dtype,
) -> tuple[RoutingBlocks, torch.Tensor] | None:
    """:func:`moe_align_block_size`'s one-program routing and the static per-tensor fp8
    quantization of ``x [M, K]`` with ``scale [1]`` in one launch: program 0 routes, the others
    quantize a piece of ``x`` each, with the bits of
    :func:`moetune.quant_kernel.quantize_activation_fast`. None where that launch does not apply
    (more than ONE_PROGRAM_SLOTS slots, the one-program path off, not fp8, or not one scale):
    the caller takes the two steps."""
    flat = topk_ids.reshape(-1)
    if (not ONE_PROGRAM_DEFAULT or flat.numel() > ONE_PROGRAM_SLOTS or qdtype not in FP8_DTYPES
            or scale.numel() != 1 or x.dim() != 2 or x.numel() == 0):  # fmt: skip
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(x.shape, dtype=qdtype, device=x.device)
    quant = (x, q, scale.float().reshape(1).contiguous(), qdtype)
    return moe_align_block_size(topk_ids, block_m, num_experts, expert_map, _quant=quant), q


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_m: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    *,
    one_program: bool | None = None,
    ranked: bool | None = None,
    _quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype] | None = None,
) -> RoutingBlocks:
    """Sort the flattened ``topk_ids [M, topk]`` slots by expert, padding each expert to
    ``block_m``; same contract as :func:`moetune.align.moe_align_block_size_torch` (slot order
    within an expert aside), in three launches, or with ``one_program`` (default
    ONE_PROGRAM_DEFAULT) in one launch up to ONE_PROGRAM_SLOTS slots, identical to it then.
    Past that, ``ranked`` (default RANKED_DEFAULT) takes two launches that give the same
    outputs as the PyTorch version, slot order included, instead of three with atomic counters
    (while chunks² x E_BINS stays within RANKED_MAX_READS; chunks of RANK_CHUNK slots).
    ``expert_map`` (global → local id or -1) gives blocks of experts on other ranks expert id
    -1. Ids must lie in [0, num_experts): the kernels do not check (that would need a host
    sync). An id outside writes outside the counters on the three-launch path, and on the
    others is dropped (a slot never computed) or lands in a bin past the histogram."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).contiguous()  # the kernels read ids at unit stride
    if expert_map is not None:
        expert_map = expert_map.to(device).contiguous()
    num_slots = flat.numel()
    max_padded = max_padded_slots(num_slots, num_experts, block_m)
    num_blocks = max_padded // block_m
    e_bins = triton.next_power_of_2(num_experts + 1)  # + the bin for lanes past the end

    sorted_token_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    if one_program is None:
        one_program = ONE_PROGRAM_DEFAULT
    if one_program and num_slots <= ONE_PROGRAM_SLOTS:
        programs, quant = 1, {}
        x = q = scale = flat  # unused without _quant
        K = stride_x = stride_q = 0
        qmax = 0.0
        if _quant is not None:
            x, q, scale, qdtype = _quant
            K, stride_x, stride_q, qmax = x.shape[1], x.stride(0), q.stride(0), quant_max(qdtype)
            programs += x.shape[0] * triton.cdiv(K, COLS)
            quant = dict(QUANT=True, COLS=COLS, MIN_EXP=fp8_min_exp(qdtype))
        _one_program_kernel[(programs,)](
            flat, sorted_token_ids, expert_ids, total,
            expert_map if expert_map is not None else flat,
            num_slots, num_experts, max_padded, num_blocks,
            x, q, scale, K, stride_x, stride_q, qmax,
            BLOCK_M=block_m, E_BINS=e_bins, SLOTS=max(16, triton.next_power_of_2(num_slots)),
            FILL=FILL_CHUNK, HAS_MAP=expert_map is not None, SIGNAL=signal_gemm1(device), **quant,
        )  # fmt: skip
        return RoutingBlocks(sorted_token_ids, expert_ids, total)
    if _quant is not None:
        raise ValueError("quantizing in the routing launch needs its one-program path")

    if ranked is None:
        ranked = RANKED_DEFAULT
    num_chunks = triton.cdiv(num_slots, RANK_CHUNK)
    if ranked and num_chunks * num_chunks * e_bins <= RANKED_MAX_READS:
        chunk_counts = torch.empty(max(num_chunks, 1) * e_bins, dtype=torch.int32, device=device)
        grid_a = max(num_chunks, triton.cdiv(max_padded, FILL_CHUNK))
        _chunk_count_kernel[(grid_a,)](
            flat, chunk_counts, sorted_token_ids, num_slots, num_experts, max_padded, num_chunks,
            E_BINS=e_bins, CHUNK=RANK_CHUNK, FILL=FILL_CHUNK,
        )  # fmt: skip
        grid_b = max(num_chunks, triton.cdiv(num_blocks, BLOCK_CHUNK))
        _chunk_place_kernel[(grid_b,)](
            flat, chunk_counts, sorted_token_ids, expert_ids, total,
            expert_map if expert_map is not None else flat,
            num_slots, num_experts, num_blocks, num_chunks,
            BLOCK_M=block_m, E_BINS=e_bins, CHUNK=RANK_CHUNK, ROWS=max(1, 4096 // e_bins),
            BLOCKS=BLOCK_CHUNK, HAS_MAP=expert_map is not None, SIGNAL=signal_gemm1(device),
        )  # fmt: skip
        return RoutingBlocks(sorted_token_ids, expert_ids, total)

    scratch = torch.zeros(2 * num_experts, dtype=torch.int32, device=device)
    counts, cursor = scratch[:num_experts], scratch[num_experts:]

    grid_a = max(triton.cdiv(num_slots, SLOT_CHUNK), triton.cdiv(max_padded, FILL_CHUNK))
    _count_kernel[(grid_a,)](
        flat, counts, sorted_token_ids, num_slots, num_experts, max_padded,
        E_BINS=e_bins, CHUNK=SLOT_CHUNK, FILL=FILL_CHUNK,
    )  # fmt: skip
    grid_b = max(triton.cdiv(num_slots, SLOT_CHUNK), triton.cdiv(num_blocks, BLOCK_CHUNK))
    _place_kernel[(grid_b,)](
        flat, counts, cursor, sorted_token_ids, expert_ids, total,
        expert_map if expert_map is not None else counts,
        num_slots, num_experts, num_blocks,
        BLOCK_M=block_m, E_BINS=e_bins, CHUNK=SLOT_CHUNK, BLOCKS=BLOCK_CHUNK,
        HAS_MAP=expert_map is not None, SIGNAL=signal_gemm1(device),
    )  # fmt: skip
    return RoutingBlocks(sorted_token_ids, expert_ids, total)
