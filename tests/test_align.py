"""Invariants of the routing metadata, apart from any numerics."""

import pytest
import torch
from helpers import random_routing

from moetune.align import max_padded_slots, moe_align_block_size_torch
from moetune.align_kernel import ONE_PROGRAM_SLOTS, moe_align_block_size
from moetune.launch import invoke_moe_gemm


def _one_program(*args, **kwargs):
    return moe_align_block_size(*args, one_program=True, **kwargs)


def _three_launches(*args, **kwargs):
    return moe_align_block_size(*args, one_program=False, ranked=False, **kwargs)


def _two_launches(*args, **kwargs):
    return moe_align_block_size(*args, one_program=False, ranked=True, **kwargs)


# The op's implementation (Triton kernels: one program up to ONE_PROGRAM_SLOTS slots, the
# default, or two launches that rank chunks, or three with atomics) and the PyTorch one kept as
# a cross-check.
IMPLS = pytest.mark.parametrize(
    "align",
    [_three_launches, _two_launches, _one_program, moe_align_block_size_torch],
    ids=["triton-3", "triton-2", "triton-1", "torch"],
)


@pytest.mark.parametrize(
    ("M", "E", "topk", "block_m", "skew"),
    [
        (1, 4, 2, 16, "uniform"),  # one token: every expert but two is empty
        (37, 7, 2, 16, "uniform"),  # prime E, counts not multiples of the block
        (64, 8, 8, 32, "uniform"),  # topk = E: every expert gets every token
        (100, 16, 2, 64, "one-hot"),  # skewed: one expert holds most slots
        (5, 3, 1, 16, "uniform"),  # topk = 1
        (32, 128, 8, 16, "uniform"),  # 256 slots: the most one program takes (Qwen3 decode)
        (1, 128, 8, 64, "one-hot"),  # all 8 slots on one expert, many empty ones
        (0, 8, 2, 16, "uniform"),  # no tokens at all
        (300, 256, 8, 16, "uniform"),  # > 1 program of slots, many experts (DeepSeek-V3)
        (1500, 8, 2, 64, "one-hot"),  # 3,000 slots over 3 programs, skewed
    ],
)
@IMPLS
def test_blocks_cover_every_slot_once(M, E, topk, block_m, skew, device, align):
    _, ids = random_routing(M, E, topk, device, skew)
    r = align(ids, block_m, E)
    num_slots = M * topk
    total = int(r.num_tokens_post_padded)
    sorted_ids = r.sorted_token_ids.cpu()
    experts = r.expert_ids.cpu()
    assert sorted_ids.numel() == max_padded_slots(num_slots, E, block_m)
    assert total % block_m == 0 and total <= sorted_ids.numel()
    used = sorted_ids[:total]
    real = used[used < num_slots]
    # A permutation of all routed slots, plus padding equal to num_slots.
    assert sorted(real.tolist()) == list(range(num_slots))
    assert torch.all(used[used >= num_slots] == num_slots)
    assert torch.all(sorted_ids[total:] == num_slots)
    flat = ids.reshape(-1).cpu().long()
    counts = torch.bincount(flat, minlength=E)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    for b in range(total // block_m):
        block = used[b * block_m : (b + 1) * block_m]
        slots = block[block < num_slots]
        assert slots.numel() > 0, "a used block holds no slot"
        # Every block belongs to exactly one expert.
        assert torch.all(flat[slots] == experts[b])
    assert torch.all(experts[total // block_m :] == -1)


@IMPLS
@pytest.mark.parametrize(("M", "E", "topk"), [(1, 128, 8), (3, 128, 8), (4, 8, 2), (40, 8, 2)])
def test_padding_bound_is_the_worst_case(M, E, topk, device, align):
    """The padded length is min(slots, experts) experts' worth of padding over the slots, and
    routing that spreads the slots over as many experts as it can fills it: the bound is tight.
    (Qwen3-30B-A3B at M=1: 8 blocks of 16, not the 121 that padding every expert would give.)"""
    block_m = 16
    num_slots = M * topk
    # slot i on expert i mod E: min(slots, E) experts hold a slot, as few slots each as can be
    ids = (torch.arange(num_slots, device=device) % E).to(torch.int32).reshape(M, topk)
    r = align(ids, block_m, E)
    holders = min(num_slots, E)
    bound = -(-(num_slots + holders * (block_m - 1)) // block_m) * block_m
    assert r.sorted_token_ids.numel() == bound == max_padded_slots(num_slots, E, block_m)
    per_expert = -(-num_slots // E) if num_slots > E else 1
    assert int(r.num_tokens_post_padded) == holders * block_m * -(-per_expert // block_m)
    if num_slots <= E:  # one slot per expert: every block of the bound is used
        assert int(r.num_tokens_post_padded) == bound


@IMPLS
def test_expert_map_marks_remote_blocks(device, align):
    _, ids = random_routing(30, 4, 2, device)
    expert_map = torch.tensor([0, -1, 1, -1], device=device)
    r = align(ids, 16, 4, expert_map)
    plain = align(ids, 16, 4)
    total = int(r.num_tokens_post_padded) // 16
    mapped = expert_map.cpu()[plain.expert_ids.cpu()[:total].long()]
    assert torch.equal(r.expert_ids.cpu()[:total].long(), mapped)


def test_padding_rows_are_never_written(device):
    """The kernel stores only rows of real slots: a sentinel row past them stays untouched."""
    M, E, topk, N, K = 9, 4, 2, 32, 32
    _, ids = random_routing(M, E, topk, device)
    routing = moe_align_block_size(ids, 16, E)
    num_slots = M * topk
    a = torch.randn(M, K, device=device, dtype=torch.float16)
    b = torch.randn(E, N, K, device=device, dtype=torch.float16)
    c_full = torch.full((num_slots + 1, N), 1234.0, device=device, dtype=torch.float16)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    invoke_moe_gemm(a, b, c_full[:num_slots], routing, config=cfg, top_k=topk,
                    compute_dtype=torch.float16)  # fmt: skip
    assert torch.all(c_full[num_slots] == 1234.0), "padding slot id was written"
    assert not torch.any(c_full[:num_slots] == 1234.0).item(), "a real slot was left unwritten"
    slot = 5
    expected = a[slot // topk].float() @ b[ids.reshape(-1)[slot].long()].float().T
    torch.testing.assert_close(c_full[slot].float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("M", "E", "topk", "block_m"), [(1, 8, 2, 16), (777, 64, 6, 32)])
def test_triton_and_torch_agree_on_blocks(M, E, topk, block_m, device):
    """Same experts per block, same used length, same slots per expert. Which of an expert's
    blocks a slot lands in follows the atomics' order on a GPU, so only the per-expert sets
    must match (one-hot routing gives expert 0 many blocks)."""
    _, ids = random_routing(M, E, topk, device, "one-hot")
    a = moe_align_block_size(ids, block_m, E)
    b = moe_align_block_size_torch(ids, block_m, E)
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.num_tokens_post_padded, b.num_tokens_post_padded)
    total = int(b.num_tokens_post_padded)

    def per_expert(r) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        ids_sorted = r.sorted_token_ids[:total].cpu().view(-1, block_m)
        for e, blk in zip(r.expert_ids[: total // block_m].tolist(), ids_sorted, strict=True):
            out.setdefault(e, []).extend(blk.tolist())
        return {e: sorted(v) for e, v in out.items()}

    assert per_expert(a) == per_expert(b)
    from moetune import ops

    assert ops.moe_align_block_size is moe_align_block_size, "the op must use the kernel version"


@pytest.mark.parametrize(("one_program", "ranked"), [(False, False), (False, True), (True, False)])
def test_kernel_version_does_not_fall_back_to_torch_ops(one_program, ranked, monkeypatch, device):
    """Matching invariants alone would also pass a wrapper around the PyTorch version."""
    from moetune import align

    _, ids = random_routing(50, 16, 4, device)
    want = moe_align_block_size_torch(ids, 16, 16)

    def forbidden(*args, **kwargs):
        raise AssertionError("routing metadata fell back to PyTorch ops")

    monkeypatch.setattr(align, "moe_align_block_size_torch", forbidden)
    for name in ("sort", "searchsorted", "cumsum"):
        monkeypatch.setattr(torch, name, forbidden)
    got = moe_align_block_size(ids, 16, 16, one_program=one_program, ranked=ranked)
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert torch.equal(got.num_tokens_post_padded, want.num_tokens_post_padded)


@pytest.mark.parametrize(("M", "topk", "block_m", "skew"), [
    (1, 8, 16, "uniform"), (32, 8, 16, "uniform"), (7, 4, 32, "one-hot"), (33, 8, 16, "uniform"),
])  # fmt: skip
def test_one_program_matches_torch_exactly(M, topk, block_m, skew, device):
    """Up to ONE_PROGRAM_SLOTS slots the kernel ranks slots in token order within an expert, as
    the PyTorch version's stable sort does: every output is equal, padding included. (33 x 8
    slots is past the limit: the three-launch path, checked only for its blocks' experts.)"""
    E = 64
    _, ids = random_routing(M, E, topk, device, skew)
    got = moe_align_block_size(ids, block_m, E, one_program=True)
    want = moe_align_block_size_torch(ids, block_m, E)
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert torch.equal(got.num_tokens_post_padded, want.num_tokens_post_padded)
    if M * topk <= ONE_PROGRAM_SLOTS:
        assert torch.equal(got.sorted_token_ids, want.sorted_token_ids)


@pytest.mark.parametrize(("M", "E", "topk", "block_m", "skew", "mapped"), [
    (33, 64, 8, 16, "uniform", False),  # 264 slots: two chunks, the second nearly empty
    (300, 256, 8, 16, "uniform", True),  # ten chunks, E_BINS 512 (8 rows of counts a pass)
    (40, 2048, 8, 16, "uniform", False),  # two chunks, E_BINS 4096 (one row a pass)
    (1500, 8, 2, 64, "one-hot", False),  # twelve chunks, one expert holding most slots
    (100, 16, 2, 64, "uniform", True),
])  # fmt: skip
def test_two_launches_match_torch_exactly(M, E, topk, block_m, skew, mapped, device):
    """The two-launch path ranks each slot by the expert's slots in earlier chunks plus its place
    in a sort of its own chunk: every output equals the PyTorch version's, slot order and padding
    included, with and without an expert map."""
    _, ids = random_routing(M, E, topk, device, skew)
    emap = None
    if mapped:  # every other expert local, numbered 0, 1, ...; the rest remote
        emap = torch.where(torch.arange(E) % 2 == 0, torch.arange(E) // 2, -1).to(device)
    got = moe_align_block_size(ids, block_m, E, emap, one_program=False, ranked=True)
    want = moe_align_block_size_torch(ids, block_m, E, emap)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_two_launches_hand_over_to_three_past_their_chunks(monkeypatch, device):
    """Past RANKED_MAX_READS (chunks² x E_BINS) the second launch's reads of every histogram
    would grow as the square of the slots: the three launches with atomics run instead."""
    from moetune import align_kernel

    ran = []
    for name in ("_chunk_place_kernel", "_place_kernel"):
        kernel = getattr(align_kernel, name)

        class Spy:
            def __init__(self, kernel=kernel, name=name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                ran.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(align_kernel, name, Spy())
    _, ids = random_routing(300, 16, 2, device)  # 600 slots: three chunks of 256
    want = moe_align_block_size_torch(ids, 16, 16)
    got = moe_align_block_size(ids, 16, 16, one_program=False, ranked=True)
    assert ran == ["_chunk_place_kernel"]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    monkeypatch.setattr(align_kernel, "RANKED_MAX_READS", 3 * 3 * 32 - 1)  # 3 chunks, E_BINS 32
    ran.clear()
    got = moe_align_block_size(ids, 16, 16, one_program=False, ranked=True)
    assert ran == ["_place_kernel"]
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert torch.equal(got.num_tokens_post_padded, want.num_tokens_post_padded)
