"""The op's sum over top-k in Triton (moetune.topk_sum, ops.TOPK_SUM_KERNEL).

What is asserted, and why:

- against :func:`topk_sum_torch` (slot 0 + slot 1 + … in fp32, one cast): the same bits, at
  shapes whose rows and columns do not fill the last program's tile; the kernel adds in that
  order, so nothing may differ;
- against the float64 sum: within ``(topk-1)·u·Σ|v|`` (u = 2⁻²⁴) plus half an ulp of the output
  dtype, the error of any fp32 sum of topk terms and one rounding cast;
- a NaN in one slot row (an unwritten, poisoned row) reaches that token's row, and only it;
- in the op: the kernel is what sums (a spy counts its calls), the op's output matches PyTorch's
  reduce bit for bit at top-k <= 2 (fp32 addition of two values commutes) and within the bound
  above at larger top-k, and passes the float64 reference check; top-k = 1 sums nothing.
"""

import pytest
import torch
from helpers import make_case

from moetune import check_close, fused_experts, fused_experts_reference, ops
from moetune import topk_sum as topk_sum_module
from moetune.ops import poisoned_workspace
from moetune.topk_sum import blocks, topk_sum, topk_sum_torch

F16, F32 = torch.float16, torch.float32
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}

# (M, topk, K): each names the edge it covers.
SHAPES = [
    pytest.param(1, 8, 2048, id="decode,topk=8"),
    pytest.param(5, 2, 72, id="K<block,rows<block"),
    pytest.param(3, 3, 600, id="K>MAX_BLOCK_K,odd"),
    pytest.param(37, 4, 40, id="many-rows,wrap"),
    pytest.param(6, 1, 96, id="topk=1"),
]


def _slots(M, topk, K, dtype, device):
    return (torch.randn(M * topk, K, device=device) * 4).to(dtype)


def _bound(slots, topk, out_dtype):
    M, K = slots.shape[0] // topk, slots.shape[1]
    abs_sum = slots.double().abs().view(M, topk, K).sum(dim=1)
    exact = slots.double().view(M, topk, K).sum(dim=1)
    bound = (topk - 1) * 2.0**-24 * abs_sum
    if out_dtype != torch.float32:  # the cast rounds to the nearest: half an ulp of the dtype
        bound = bound + exact.abs() * torch.finfo(out_dtype).eps / 2 + torch.finfo(out_dtype).tiny
    return exact, bound


@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize(("M", "topk", "K"), SHAPES)
def test_the_kernel_adds_in_slot_order_and_is_close_to_the_exact_sum(M, topk, K, dtype, device):
    slots = _slots(M, topk, K, dtype, device)
    out = topk_sum(slots, topk)
    assert out.shape == (M, K) and out.dtype == dtype
    assert not torch.isnan(out).any()
    assert torch.equal(out, topk_sum_torch(slots, topk))
    exact, bound = _bound(slots, topk, dtype)
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_blocks_cover_the_columns_and_keep_the_program_size():
    assert blocks(1, 2048) == (1, 1024)
    assert blocks(4096, 4096) == (1, 1024)
    assert blocks(4096, 72) == (8, 128)
    assert blocks(3, 40) == (4, 64)
    assert blocks(4096, 4096, elements=2048, max_block_k=512) == (4, 512)
    for M, K in [(1, 1), (7, 5000), (4096, 2880)]:
        bm, bk = blocks(M, K)
        assert bm * bk <= max(topk_sum_module.ELEMENTS, bk) and bk <= topk_sum_module.MAX_BLOCK_K


def test_a_nan_slot_row_reaches_its_token_only(device):
    M, topk, K = 6, 3, 72
    slots = _slots(M, topk, K, F16, device)
    slots[2 * topk + 1, 5] = float("nan")  # token 2, slot 1, column 5
    out = topk_sum(slots, topk)
    nan = torch.isnan(out)
    assert bool(nan[2, 5]) and int(nan.sum()) == 1


def test_the_kernel_refuses_rows_that_are_not_whole_tokens(device):
    with pytest.raises(ValueError, match="M\\*topk"):
        topk_sum(torch.zeros(5, 8, device=device), 2)
    with pytest.raises(ValueError, match="M\\*topk"):
        topk_sum(torch.zeros(4, device=device), 2)
    assert topk_sum(torch.zeros(0, 8, device=device), 2).shape == (0, 8)


@pytest.mark.parametrize(
    ("M", "E", "N", "K", "topk", "quant", "activation"),
    [
        pytest.param(9, 5, 32, 72, 2, None, "silu", id="topk=2"),
        pytest.param(11, 6, 32, 40, 3, None, "silu", id="topk=3"),
        pytest.param(9, 5, 32, 72, 4, "fp8_w8a8", "swigluoai", id="fp8,swigluoai,topk=4"),
        pytest.param(7, 4, 32, 64, 1, None, "silu", id="topk=1"),
    ],
)
def test_the_op_sums_with_the_kernel(M, E, N, K, topk, quant, activation, device, monkeypatch):
    case = make_case(M, E, N, K, topk, F16, device, quant=quant, bias=True, activation=activation)
    calls, seen = [], []

    def spy(x, k):
        calls.append((tuple(x.shape), k))
        seen.append(x.clone())
        return topk_sum(x, k)

    monkeypatch.setattr(ops, "topk_sum", spy)

    def run(kernel: bool) -> torch.Tensor:
        monkeypatch.setattr(ops, "TOPK_SUM_KERNEL", kernel)
        with poisoned_workspace():
            return fused_experts(*case.args(), config=SMALL, **case.kwargs)

    ours, torchs = run(True), run(False)
    assert calls == ([((M * topk, K), topk)] if topk > 1 else [])
    assert ours.shape == (M, K) and not torch.isnan(ours).any()
    if topk <= 2:
        assert torch.equal(ours, torchs)
    else:  # fp32 sums of the same slot values, perhaps in another order, then one cast each
        abs_sum = seen[0].float().abs().view(M, topk, K).sum(dim=1)
        ulp = torch.finfo(F16).eps * torch.maximum(ours.abs(), torchs.abs()).float()
        bound = 2 * (topk - 1) * 2.0**-24 * abs_sum + ulp + torch.finfo(F16).tiny
        assert bool(((ours.float() - torchs.float()).abs() <= bound).all())
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(ours, ref, dtype=F16, quant=quant)
    assert result.ok, result


@pytest.mark.gpu
@pytest.mark.parametrize(("M", "topk", "K"), [(1, 8, 2048), (4096, 2, 4096), (517, 4, 2880)])
def test_the_kernel_on_a_gpu_in_bf16(M, topk, K):
    slots = _slots(M, topk, K, torch.bfloat16, "cuda")
    out = topk_sum(slots, topk)
    assert torch.equal(out, topk_sum_torch(slots, topk))
    exact, bound = _bound(slots, topk, torch.bfloat16)
    assert bool(((out.double() - exact).abs() <= bound).all())
