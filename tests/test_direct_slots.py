"""Decode without the routing launch (ops.DIRECT_SLOTS_MAX_M, align.DirectSlots): at M=1 each
GEMM program's block holds one slot and takes that slot's expert from topk_ids. What must hold:
the op's output is the sorted routing's bit for bit and passes the float64 reference, in every
quantization mode and activation, fused or not; no routing launch runs; a wrong expert shows;
past the limit, or with an expert_map, the op keeps the sorted routing."""

import pytest
import torch
from helpers import make_case, record_launches

from moetune import align, check_close, fused_experts, fused_experts_reference, ops
from moetune.inputs import static_activation_scales
from moetune.ops import poisoned_workspace

CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
# (quant, extra case keywords, static activation scales)
MODES = {
    "fp16": (None, {}, False),
    "int8_w8a16": ("int8_w8a16", {}, False),
    "fp8-dynamic": ("fp8_w8a8", {}, False),
    "fp8-static": ("fp8_w8a8", {}, True),
    "fp8-per-token": ("fp8_w8a8", {"per_channel": True}, False),
    "fp8-block": ("fp8_w8a8", {"block_shape": (32, 32)}, False),
    "int8_w8a8": ("int8_w8a8", {"per_channel": True}, False),
}


def _case(mode: str, M: int, activation: str, device: str, dtype=torch.float16):
    quant, extra, static = MODES[mode]
    case = make_case(M, 8, 64, 96, 4, dtype, device, quant=quant, bias=True,
                     activation=activation, **extra)  # fmt: skip
    if static:
        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    return case, quant


def _run(case, config, *, limit, monkeypatch):
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", limit)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, **case.kwargs)


def _direct_matches_routed(case, config, *, limit, dtype, quant=None, monkeypatch):
    """The op routed, then with direct slots up to ``limit`` tokens: the GEMMs took each path
    (their direct_slots argument), and the direct output is the routed one's bits, NaN-free,
    and passes the float64 reference."""
    launches = record_launches(monkeypatch, run=True)
    routed = _run(case, config, limit=None, monkeypatch=monkeypatch)
    direct = _run(case, config, limit=limit, monkeypatch=monkeypatch)
    assert [kw["direct_slots"] for kw in launches] == [0, 0, 1, 1]
    assert not torch.isnan(direct).any()
    assert torch.equal(direct, routed)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(direct, ref, dtype=dtype, quant=quant)
    assert result.ok, result


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "steps"])
def test_direct_slots_give_the_sorted_routings_bits(mode, activation, fuse, device, monkeypatch):
    case, quant = _case(mode, 1, activation, device)
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    _direct_matches_routed(case, CONFIG, limit=1, dtype=torch.float16, quant=quant,
                           monkeypatch=monkeypatch)  # fmt: skip


def _refuse(*args, **kwargs):
    raise AssertionError("the routing ran")


@pytest.mark.parametrize("mode", ["fp16", "fp8-static", "fp8-block"])
def test_no_routing_launch_at_one_token(mode, device, monkeypatch):
    case, quant = _case(mode, 1, "silu", device)
    monkeypatch.setattr(ops, "moe_align_block_size", _refuse)
    monkeypatch.setattr(ops, "align_and_quantize", _refuse)
    out = fused_experts(*case.args(), config=CONFIG, **case.kwargs)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16, quant=quant).ok


def test_past_the_limit_the_routing_runs(device, monkeypatch):
    case, _ = _case("fp16", 2, "silu", device)
    calls = []
    real = ops.moe_align_block_size
    monkeypatch.setattr(
        ops, "moe_align_block_size", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    launches = record_launches(monkeypatch, run=True)
    fused_experts(*case.args(), config=CONFIG, **case.kwargs)
    assert len(calls) == 1
    assert [kw["direct_slots"] for kw in launches] == [0, 0]


def test_an_expert_map_keeps_the_sorted_routing(device, monkeypatch):
    case, _ = _case("fp16", 1, "silu", device)
    case.kwargs["expert_map"] = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32,
                                             device=device)  # fmt: skip
    # 8 global experts, 4 on this rank: the local weights are the even experts' rows
    w1, w2 = case.w1[::2].contiguous(), case.w2[::2].contiguous()
    for key in ("w1_bias", "w2_bias"):
        case.kwargs[key] = case.kwargs[key][::2].contiguous()
    args = (case.x, w1, w2, case.topk_weights, case.topk_ids)
    launches = record_launches(monkeypatch, run=True)
    out = fused_experts(*args, config=CONFIG, **case.kwargs)
    assert [kw["direct_slots"] for kw in launches] == [0, 0]
    ref = fused_experts_reference(*args, **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok


def test_a_wrong_expert_shows(device, monkeypatch):
    """The bit test can fail: blocks that read the next slot's expert give another output, and
    the reference check catches it."""
    case, _ = _case("fp16", 1, "silu", device)
    good = _run(case, CONFIG, limit=1, monkeypatch=monkeypatch)
    monkeypatch.setattr(ops, "direct_slots", lambda ids: align.DirectSlots(ids.reshape(-1).roll(1)))
    bad = _run(case, CONFIG, limit=1, monkeypatch=monkeypatch)
    assert not torch.equal(good, bad)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert not check_close(bad, ref, dtype=torch.float16).ok


def test_repeated_experts_and_int64_ids(device, monkeypatch):
    """Router ids need not be distinct or int32: each slot's block reads its own expert."""
    case, _ = _case("fp16", 1, "silu", device)
    case.topk_ids = torch.tensor([[5, 5, 2, 5]], dtype=torch.int64, device=device)
    launches = record_launches(monkeypatch, run=True)
    out = _run(case, CONFIG, limit=1, monkeypatch=monkeypatch)
    assert launches[0]["direct_slots"] == 1
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok
    assert torch.equal(out, _run(case, CONFIG, limit=None, monkeypatch=monkeypatch))


def test_a_down_config_of_other_rows_needs_no_second_routing(device, monkeypatch):
    case, _ = _case("fp8-dynamic", 1, "swigluoai", device)
    down = {**CONFIG, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}
    monkeypatch.setattr(ops, "moe_align_block_size", _refuse)
    out = fused_experts(*case.args(), config=CONFIG, config_down=down, **case.kwargs)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16, quant="fp8_w8a8").ok


def test_compile_processes_build_the_kernel_one_token_launches(device, monkeypatch):
    """Compile processes warm up at 16 tokens; the op at M=1 launches with the same constexprs
    and argument types. (That direct_slots is not specialized on, so the two share one compiled
    kernel, is checked by compiling for sm90 in test_hopper_compile.py.)"""
    from helpers import record_launches_and_warmups

    from moetune.launch import compile_only

    seen = record_launches_and_warmups(monkeypatch)
    one, _ = _case("fp8-static", 1, "silu", device)
    sixteen, _ = _case("fp8-static", 16, "silu", "cpu")
    fused_experts(*one.args(), config=CONFIG, **one.kwargs)
    with compile_only():
        fused_experts(*sixteen.args(), config=CONFIG, **sixteen.kwargs)
    launched = [(types, kw) for types, kw, _ in seen["launch"]]
    warmed = [(types, kw) for types, kw, _ in seen["warmup"]]
    assert launched == warmed


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp16", "fp8-static", "fp8-block"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["pointers", "tma"])
def test_direct_slots_bf16_gpu(mode, block_m, device, monkeypatch):
    """bf16 (GPU only), top-8 of 64 experts at Qwen3's hidden size; 64-row tiles load the
    weights through TMA: the sorted routing's bits, and the check."""
    quant, extra, static = MODES[mode]
    if "block_shape" in extra:
        extra = {"block_shape": (128, 128)}
    case = make_case(1, 64, 384, 2048, 8, torch.bfloat16, device, quant=quant, bias=True,
                     **extra)  # fmt: skip
    if static:
        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128,
              "GROUP_SIZE_M": 1}  # fmt: skip
    _direct_matches_routed(case, config, limit=1, dtype=torch.bfloat16, quant=quant,
                           monkeypatch=monkeypatch)  # fmt: skip


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("sum_in_gemm2", [False, True], ids=["store", "sum-in-gemm2"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["pointers", "tma"])
def test_several_tokens_and_grouped_tiles(topk, sum_in_gemm2, block_m, device, monkeypatch):
    """Past M=1 (a limit of 4 here) the token rows differ from the slots (slot // topk), tiles
    are grouped (GROUP_SIZE_M=4), GEMM2 may sum over top-k, and 64-row tiles load the weights
    through TMA: the routed output's bits still, and the check."""
    case = make_case(3, 8, 64, 96, topk, torch.float16, device, bias=True, exact_dots=True)
    config = {**CONFIG, "BLOCK_SIZE_M": block_m, "GROUP_SIZE_M": 4}
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", 1 if sum_in_gemm2 else None)
    _direct_matches_routed(case, config, limit=4, dtype=torch.float16, monkeypatch=monkeypatch)
