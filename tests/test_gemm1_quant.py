"""The input's static fp8 quantization inside GEMM1 at one token (ops.QUANTIZE_IN_GEMM1,
launch.invoke_moe_gemm's quantize_a).

On direct slots (M=1) no routing launch runs for the quantization to ride in, so it had a launch
of its own. With the switch on, GEMM1 loads the input in the compute dtype and quantizes each
tile with the quantization kernel's arithmetic. What must hold: the op's output is the same bits
(inputs that clamp at the format's limit, a K tail the tiles mask, the fused and the separate
activation, e4m3fn and e4m3fnuz) with no quantization launch, and passes the float64 reference
check; outside its reach (more tokens, per-token, dynamic or block scales, int8, switched off)
the input keeps its own launch; the launcher refuses what the kernel cannot quantize.
"""

import pytest
import torch
from helpers import make_case

from moetune import check_close, fused_experts, fused_experts_reference, ops
from moetune.align import direct_slots
from moetune.launch import invoke_moe_gemm
from moetune.ops import poisoned_workspace
from moetune.quant import quant_max

F16 = torch.float16
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
FNUZ_SKIP = pytest.mark.skipif(
    torch.cuda.is_available() and torch.version.hip is None,
    reason="e4m3fnuz is the MI300X/MI325X dialect: NVIDIA GPUs cannot compile it",
)


def _case(M, topk, device, *, activation="silu", fp8=torch.float8_e4m3fn, per_channel=False,
          K=72):  # fmt: skip
    case = make_case(M, 6, 32, K, topk, F16, device, quant="fp8_w8a8", bias=True,
                     activation=activation, per_channel=per_channel, fp8_dtype=fp8)  # fmt: skip
    case.x.mul_(3)
    amax = float(case.x.float().abs().max())
    # 0.8 of the input's range: its largest values clamp at the format's limit.
    a1 = torch.full((M, 1), amax / quant_max(fp8), device=device) if per_channel else \
        torch.tensor([0.8 * amax / quant_max(fp8)], device=device)  # fmt: skip
    case.kwargs.update(a1_scale=a1, a2_scale=torch.tensor([0.05], device=device))
    return case


def _op(case, monkeypatch, on, config=SMALL):
    monkeypatch.setattr(ops, "QUANTIZE_IN_GEMM1", on)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, **case.kwargs)


def _count_quantizations(monkeypatch) -> list[int]:
    calls, real = [], ops.quantize_activation

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "quantize_activation", spy)
    return calls


# 64 rows: the weights through TMA where the GPU has it (launch.WEIGHTS_TMA_MIN_BLOCK_M).
WIDE = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}


@pytest.mark.parametrize(
    ("activation", "fuse_max", "fp8", "K", "config"),
    [
        pytest.param("silu", 64, torch.float8_e4m3fn, 72, SMALL, id="silu-fused-K-tail"),
        pytest.param("swigluoai", 64, torch.float8_e4m3fn, 64, SMALL, id="swigluoai"),
        pytest.param("silu", 0, torch.float8_e4m3fn, 72, SMALL, id="separate-activation"),
        pytest.param("silu", 64, torch.float8_e4m3fn, 64, WIDE, id="64-rows"),
        pytest.param("silu", 64, torch.float8_e4m3fnuz, 72, SMALL, id="e4m3fnuz", marks=FNUZ_SKIP),
    ],
)
def test_one_token_gives_the_same_bits_without_the_quantization_launch(
    activation, fuse_max, fp8, K, config, device, monkeypatch
):
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", fuse_max)
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", 1)
    case = _case(1, 2, device, activation=activation, fp8=fp8, K=K)
    scale = float(case.kwargs["a1_scale"])
    assert bool((case.x.float() / scale).abs().gt(quant_max(fp8)).any()), "no input clamps"
    calls = _count_quantizations(monkeypatch)
    before = _op(case, monkeypatch, on=False, config=config)
    assert len(calls) == 1, "switched off, the input is quantized in its own launch"
    after = _op(case, monkeypatch, on=True, config=config)
    assert len(calls) == 1, "switched on, the input was quantized in its own launch again"
    assert not torch.isnan(after).any()
    assert torch.equal(after, before)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(after, ref, dtype=F16, quant="fp8_w8a8")
    assert result.ok, result


def test_outside_its_reach_the_input_keeps_its_launch(device, monkeypatch):
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", 1)
    calls = _count_quantizations(monkeypatch)
    dynamic = _case(1, 2, device)
    del dynamic.kwargs["a1_scale"]
    mapped = _case(1, 2, device)  # an expert map: no direct slots
    mapped.kwargs["expert_map"] = torch.arange(6, dtype=torch.int32, device=device)
    int8 = make_case(1, 6, 32, 64, 2, F16, device, quant="int8_w8a8")
    block = make_case(1, 6, 64, 128, 2, F16, device, quant="fp8_w8a8", block_shape=(32, 32))
    # Two tokens: routed (their quantization rides in the routing launch, or has its own).
    monkeypatch.setattr(ops, "QUANTIZE_IN_ROUTING", False)
    cases = {"two tokens": (_case(2, 2, device), "fp8_w8a8"),
             "per-token scale": (_case(1, 2, device, per_channel=True), "fp8_w8a8"),
             "dynamic scale": (dynamic, "fp8_w8a8"), "expert map": (mapped, "fp8_w8a8"),
             "int8": (int8, "int8_w8a8"), "block scales": (block, "fp8_w8a8")}  # fmt: skip
    for why, (case, quant) in cases.items():
        calls.clear()
        before = _op(case, monkeypatch, on=False)
        launches = len(calls)  # the input's, and GEMM2's input's where it is quantized apart
        assert launches >= 1, why
        after = _op(case, monkeypatch, on=True)
        assert len(calls) == 2 * launches, f"{why}: the input's own quantization did not run"
        assert torch.equal(after, before), why
        ref = fused_experts_reference(*case.args(), **case.kwargs)
        assert check_close(after, ref, dtype=F16, quant=quant).ok, why


@pytest.mark.parametrize(
    ("M", "quant", "on", "quantize_a", "dependent"),
    [(1, "fp8", True, True, False), (1, "fp8", False, False, True), (1, None, True, False, False),
     (2, "fp8", True, False, True), (2, None, False, False, True)],
)  # fmt: skip
def test_gemm1_launch_flags(M, quant, on, quantize_a, dependent, device, monkeypatch):
    """GEMM1 quantizes its input on one token's static fp8 alone, and launches as a dependent
    (launch.PDL_GEMM1) where an op's kernel ran ahead of it: routing, or the quantization."""
    from moetune import launch

    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", 1)
    monkeypatch.setattr(launch, "PDL_GEMM1", True)
    seen, real = [], ops.invoke_moe_gemm

    def spy(*args, **kwargs):
        seen.append((kwargs.get("quantize_a", False), kwargs.get("dependent", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "invoke_moe_gemm", spy)
    case = _case(M, 2, device) if quant else make_case(M, 6, 32, 64, 2, F16, device)
    _op(case, monkeypatch, on=on)
    assert seen[0] == (quantize_a, dependent)
    assert seen[1] == (False, True), "GEMM2 always follows the op's own kernel"


def test_the_launcher_refuses_what_it_cannot_quantize(device):
    case = _case(1, 2, device)
    x, w1, ids = case.x, case.args()[1], case.args()[4]
    out = torch.empty(2, 64, dtype=F16, device=device)
    common = dict(config=SMALL, top_k=2, compute_dtype=F16, quant="fp8_w8a8",
                  b_scale=case.kwargs["w1_scale"], quantize_a=True)  # fmt: skip
    one = case.kwargs["a1_scale"]
    refused = {
        "per-token scales": (x, torch.ones(1, 1, device=device).repeat(2, 1)),
        "an input already quantized": (x.to(w1.dtype), one),
        "no input scale": (x, None),
    }
    for why, (a, a_scale) in refused.items():
        with pytest.raises(ValueError, match="quantize_a needs"):
            invoke_moe_gemm(a, w1, out, direct_slots(ids), a_scale=a_scale, **common)
            pytest.fail(why)
