"""The input's static fp8 quantization in the routing launch (ops.QUANTIZE_IN_ROUTING,
align_kernel.align_and_quantize).

At decode sizes the routing runs as one program of one launch; the op's input quantization
(static per-tensor fp8) can ride in that launch as extra programs. What must hold: the routing is
the one-program routing, bit for bit; the quantized input is quantize_activation_fast's, bit for
bit (NaN kept, the clamp at the format's limit, e4m3fn and e4m3fnuz); the op's output is the same
bits with one launch fewer and passes the float64 reference check; and everything outside the
path's reach (more slots, dynamic or per-token scales, int8, the path switched off) keeps the two
launches.
"""

import pytest
import torch
from helpers import make_case

from moetune import align_kernel, check_close, fused_experts, fused_experts_reference, ops
from moetune.align_kernel import align_and_quantize, moe_align_block_size
from moetune.ops import poisoned_workspace
from moetune.quant import quant_max
from moetune.quant_kernel import quantize_activation_fast

F16 = torch.float16
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
FNUZ_SKIP = pytest.mark.skipif(
    torch.cuda.is_available() and torch.version.hip is None,
    reason="e4m3fnuz is the MI300X/MI325X dialect: NVIDIA GPUs cannot compile it",
)


def _ids(M, E, topk, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(M)]).to(device)


@pytest.mark.parametrize(
    ("M", "K", "topk", "fp8"),
    [
        pytest.param(1, 64, 2, torch.float8_e4m3fn, id="M=1"),
        pytest.param(7, 1100, 4, torch.float8_e4m3fn, id="K>COLS,K%COLS!=0"),
        pytest.param(32, 96, 8, torch.float8_e4m3fn, id="256-slots"),
        pytest.param(5, 200, 2, torch.float8_e4m3fnuz, id="e4m3fnuz", marks=FNUZ_SKIP),
    ],
)
def test_one_launch_gives_both_steps_bits(M, K, topk, fp8, device):
    E = 16
    ids = _ids(M, E, topk, device)
    x = (torch.randn(M, K, device=device) * 3).to(F16)
    x[0, 3] = float("nan")  # the same bits there too; on a GPU it stays NaN
    scale = torch.tensor([0.8 * float(x.float().nan_to_num().abs().max()) / quant_max(fp8)],
                         device=device)  # fmt: skip
    assert bool((x.float() / scale).abs().gt(quant_max(fp8)).any()), "no input clamps"
    got = align_and_quantize(ids, 16, E, None, x, scale, fp8)
    assert got is not None
    routing, q = got
    want_q, _ = quantize_activation_fast(x, fp8, scale=scale)
    assert q.dtype == fp8 and q.shape == (M, K)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    if device == "cuda":  # the interpreter casts a NaN fp32 to fp8 as 384 (test_quant_kernel)
        assert torch.isnan(q[0, 3].float())
    want = moe_align_block_size(ids, 16, E, None, one_program=True)
    for a, b in zip(routing, want, strict=True):
        assert torch.equal(a, b)


def test_expert_map_is_kept(device):
    ids = _ids(6, 8, 2, device)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32, device=device)
    x = torch.randn(6, 64, device=device).to(F16)
    scale = torch.tensor([0.01], device=device)
    routing, _ = align_and_quantize(ids, 16, 8, expert_map, x, scale, torch.float8_e4m3fn)
    want = moe_align_block_size(ids, 16, 8, expert_map, one_program=True)
    for a, b in zip(routing, want, strict=True):
        assert torch.equal(a, b)


def test_outside_its_reach_it_declines(device, monkeypatch):
    x = torch.randn(40, 64, device=device).to(F16)
    one = torch.tensor([0.01], device=device)
    fp8 = torch.float8_e4m3fn
    assert align_and_quantize(_ids(40, 16, 8, device), 16, 16, None, x, one, fp8) is None, \
        "320 slots: past the one-program path"  # fmt: skip
    ids = _ids(4, 16, 2, device)
    assert align_and_quantize(ids, 16, 16, None, x[:4], torch.ones(4, 1, device=device),
                              fp8) is None, "per-token scales"  # fmt: skip
    assert align_and_quantize(ids, 16, 16, None, x[:4], one, torch.int8) is None
    monkeypatch.setattr(align_kernel, "ONE_PROGRAM_DEFAULT", False)
    assert align_and_quantize(ids, 16, 16, None, x[:4], one, fp8) is None


def _count_quantizations(monkeypatch) -> list[int]:
    calls, real = [], ops.quantize_activation

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "quantize_activation", spy)
    return calls


def _static_case(M, topk, device, activation="silu", per_channel=False):
    case = make_case(M, max(6, topk + 2), 32, 72, topk, F16, device, quant="fp8_w8a8", bias=True,
                     activation=activation, per_channel=per_channel)  # fmt: skip
    amax = float(case.x.float().abs().max())
    a1 = torch.full((M, 1), amax / 448.0, device=device) if per_channel else \
        torch.tensor([0.8 * amax / 448.0], device=device)  # fmt: skip
    case.kwargs.update(a1_scale=a1, a2_scale=torch.tensor([0.05], device=device))
    return case


def _op(case, monkeypatch, on):
    monkeypatch.setattr(ops, "QUANTIZE_IN_ROUTING", on)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=SMALL, **case.kwargs)


@pytest.mark.parametrize(
    ("M", "topk", "activation", "fuse_max"),
    [
        pytest.param(1, 2, "silu", 64, id="M=1"),
        pytest.param(9, 4, "swigluoai", 64, id="swigluoai"),
        pytest.param(12, 2, "silu", 0, id="unfused-activation"),
    ],
)
def test_the_op_gives_the_same_bits_with_one_launch_fewer(M, topk, activation, fuse_max, device,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", fuse_max)
    # One token's slots skip the routing launch (test_direct_slots.py): route them here.
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", None)
    case = _static_case(M, topk, device, activation)
    calls = _count_quantizations(monkeypatch)
    before = _op(case, monkeypatch, on=False)
    assert len(calls) == 1, "the two-launch path quantizes the input in its own launch"
    after = _op(case, monkeypatch, on=True)
    assert len(calls) == 1, "the input was quantized in its own launch again"
    assert not torch.isnan(after).any()
    assert torch.equal(after, before)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(after, ref, dtype=F16, quant="fp8_w8a8")
    assert result.ok, result


def test_the_op_keeps_two_launches_where_the_path_does_not_reach(device, monkeypatch):
    calls = _count_quantizations(monkeypatch)
    cases = [
        _static_case(40, 8, device),  # 320 slots
        _static_case(5, 2, device, per_channel=True),
    ]
    dynamic = _static_case(5, 2, device)
    del dynamic.kwargs["a1_scale"]
    cases.append(dynamic)
    # At one token a per-token scale has one element too: per_channel_quant alone keeps it out.
    cases.append(_static_case(1, 2, device, per_channel=True))
    for case in cases:
        calls.clear()
        out = _op(case, monkeypatch, on=True)
        assert len(calls) == 1, "the input's own quantization launch did not run"
        ref = fused_experts_reference(*case.args(), **case.kwargs)
        assert check_close(out, ref, dtype=F16, quant="fp8_w8a8").ok


def test_a_routing_quantization_with_the_wrong_scale_fails_the_check(device, monkeypatch):
    """The tests above can fail: quantizing in the routing launch with another scale than the
    GEMM dequantizes with changes the output, and the reference check rejects it."""
    real = ops.align_and_quantize

    def wrong(topk_ids, block_m, num_experts, expert_map, x, scale, qdtype):
        return real(topk_ids, block_m, num_experts, expert_map, x, scale * 4, qdtype)

    monkeypatch.setattr(ops, "align_and_quantize", wrong)
    case = _static_case(6, 2, device)
    out = _op(case, monkeypatch, on=True)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert not check_close(out, ref, dtype=F16, quant="fp8_w8a8").ok


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 32])
def test_routing_quantization_bf16_gpu(M, device, monkeypatch):
    """bf16 (GPU only), top-8 as Qwen3: the same bits as the two launches, and the check."""
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", None)  # M=1 routes too (test_direct_slots.py)
    case = make_case(M, 64, 192, 2048, 8, torch.bfloat16, device, quant="fp8_w8a8", bias=True)
    amax = float(case.x.float().abs().max())
    case.kwargs.update(a1_scale=torch.tensor([0.8 * amax / 448.0], device=device),
                       a2_scale=torch.tensor([0.05], device=device))  # fmt: skip
    calls = _count_quantizations(monkeypatch)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(ops, "QUANTIZE_IN_ROUTING", on)
        with poisoned_workspace():
            outs.append(fused_experts(*case.args(), **case.kwargs))
    assert len(calls) == 1, "the routing launch did not quantize the input"
    assert torch.equal(outs[1], outs[0])
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(outs[1], ref, dtype=torch.bfloat16, quant="fp8_w8a8").ok
