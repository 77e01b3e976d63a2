"""GEMM1 quantizing its input as it loads it (ops.QUANT_A_IN_GEMM1_MAX_M, kernel ``QUANT_A``).

For fp8_w8a8 with one static per-tensor input scale, the op can skip the launch that quantizes
``hidden_states`` and let GEMM1 quantize each A tile it loads with the quantization kernel's
arithmetic (``quant_kernel.quantize_fp8``). Both paths feed the tensor cores the same fp8
operands, so the op's output must be the same bits, with the quantization launch gone; and both
must pass the float64 reference check. Scales are calibrated small enough that some inputs clamp
at the fp8 limit and others fall in the subnormal range, so rounding and clamping are exercised.
"""

import pytest
import torch
from helpers import make_case, record_launches, record_launches_and_warmups

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops, quant_kernel
from moetune.align import moe_align_block_size_torch
from moetune.launch import compile_only
from moetune.ops import poisoned_workspace
from moetune.quant import quant_max

SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
F16 = torch.float16
FNUZ_SKIP = pytest.mark.skipif(
    torch.cuda.is_available() and torch.version.hip is None,
    reason="e4m3fnuz is the MI300X/MI325X dialect: NVIDIA GPUs cannot compile it",
)


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    return record_launches(monkeypatch, run=True)


def _case(M, device, *, activation="silu", fp8=torch.float8_e4m3fn, K=72, a1_scale=None):
    case = make_case(M, 5, 32, K, 2, F16, device, quant="fp8_w8a8", bias=True,
                     activation=activation, fp8_dtype=fp8)  # fmt: skip
    x_amax = float(case.x.float().abs().max())
    qmax = 448.0 if fp8 == torch.float8_e4m3fn else 240.0
    # A scale that clamps the largest inputs: the clamp and round must match too.
    scale = a1_scale if a1_scale is not None else 0.8 * x_amax / qmax
    case.kwargs.update(a1_scale=torch.tensor([scale], device=device),
                       a2_scale=torch.tensor([0.05], device=device))  # fmt: skip
    return case


def _run(case, monkeypatch, *, qa_max):
    monkeypatch.setattr(ops, "QUANT_A_IN_GEMM1_MAX_M", qa_max)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=SMALL, **case.kwargs)


def _count_quant_launches(monkeypatch) -> list[int]:
    """How many times the op's input quantization ran, appended per call."""
    calls, real = [], ops.quantize_activation

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "quantize_activation", spy)
    return calls


@pytest.mark.parametrize(
    ("M", "activation", "fp8", "fuse_max"),
    [
        pytest.param(1, "silu", torch.float8_e4m3fn, 64, id="M=1"),
        pytest.param(13, "silu", torch.float8_e4m3fn, 64, id="M=13,fused-epilogue"),
        pytest.param(13, "silu", torch.float8_e4m3fn, 0, id="M=13,unfused-activation"),
        pytest.param(9, "swigluoai", torch.float8_e4m3fn, 64, id="swigluoai"),
        pytest.param(9, "silu", torch.float8_e4m3fnuz, 64, id="e4m3fnuz", marks=FNUZ_SKIP),
    ],
)
def test_quantizing_in_gemm1_changes_no_bit(M, activation, fp8, fuse_max, device, monkeypatch,
                                            launches):  # fmt: skip
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", fuse_max)
    case = _case(M, device, activation=activation, fp8=fp8)
    x = case.x.float() / case.kwargs["a1_scale"]
    assert bool((x.abs() > (448.0 if fp8 == torch.float8_e4m3fn else 240.0)).any()), "no clamp"
    quantized = _count_quant_launches(monkeypatch)
    before = _run(case, monkeypatch, qa_max=None)
    assert [k["QUANT_A"] for k in launches] == [False, False]
    assert len(quantized) == 1, "the default path quantizes the input in its own launch"
    launches.clear()
    after = _run(case, monkeypatch, qa_max=M)
    assert [k["QUANT_A"] for k in launches] == [True, False], "GEMM1 did not quantize its input"
    assert launches[0]["A_QMAX"] == quant_max(fp8)
    assert len(quantized) == 1, "the input was still quantized in its own launch"
    assert not torch.isnan(after).any()
    assert torch.equal(after, before)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(after, ref, dtype=F16, quant="fp8_w8a8")
    assert result.ok, result


def test_a_wrong_scale_in_gemm1_fails_the_check(device, monkeypatch):
    """The test above can fail: GEMM1 quantizing with another scale than it dequantizes with
    gives a different output, which the reference check rejects."""
    case = _case(7, device)
    real = launch.invoke_moe_gemm

    def wrong_scale(a, b, c, routing, **kwargs):
        if kwargs.get("quant_a"):
            doubled = kwargs["a_scale"] * 2
            return real(a, b, c, routing, **{**kwargs, "a_scale": doubled})
        return real(a, b, c, routing, **kwargs)

    monkeypatch.setattr(ops, "invoke_moe_gemm", wrong_scale)
    out = _run(case, monkeypatch, qa_max=64)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert not check_close(out, ref, dtype=F16, quant="fp8_w8a8").ok


def test_only_static_per_tensor_fp8_and_up_to_the_limit(device, monkeypatch, launches):
    """Dynamic scales, per-token scales and every other quantization keep the separate launch;
    static per-tensor fp8 quantizes in GEMM1 up to the limit (inclusive), never with None."""
    assert ops.quant_a_in_gemm1(1, True) == (ops.QUANT_A_IN_GEMM1_MAX_M is not None)
    for M, limit, static, want in [(8, 8, True, True), (9, 8, True, False), (8, None, True, False),
                                   (8, 64, False, False)]:  # fmt: skip
        case = _case(M, device)
        if not static:
            del case.kwargs["a1_scale"]
        launches.clear()
        out = _run(case, monkeypatch, qa_max=limit)
        assert ops.quant_a_in_gemm1(M, static) == want
        assert launches[0]["QUANT_A"] == want, (M, limit, static)
        ref = fused_experts_reference(*case.args(), **case.kwargs)
        assert check_close(out, ref, dtype=F16, quant="fp8_w8a8").ok
    # Per-token static scales and int8 never take it.
    case = make_case(6, 4, 32, 64, 2, F16, device, quant="fp8_w8a8", per_channel=True)
    case.kwargs.update(a1_scale=torch.full((6, 1), 0.02, device=device))
    launches.clear()
    _run(case, monkeypatch, qa_max=64)
    assert launches[0]["QUANT_A"] is False
    case = make_case(6, 4, 32, 64, 2, F16, device, quant="int8_w8a8")
    case.kwargs.update(a1_scale=torch.tensor([0.02], device=device))
    launches.clear()
    _run(case, monkeypatch, qa_max=64)
    assert launches[0]["QUANT_A"] is False


def test_the_launcher_refuses_what_quant_a_cannot_honour(device):
    case = make_case(4, 2, 16, 32, 2, F16, device, quant="fp8_w8a8")
    routing = moe_align_block_size_torch(case.topk_ids, 16, 2, None)
    one = torch.ones(1, device=device)
    kw = dict(config=SMALL, top_k=2, compute_dtype=F16, quant="fp8_w8a8", quant_a=True,
              b_scale=case.kwargs["w1_scale"])  # fmt: skip
    out = torch.empty(8, 32, dtype=F16, device=device)
    q, _ = quant_kernel.quantize_activation_fast(case.x, torch.float8_e4m3fn, scale=one)
    bad = [
        (q, {"a_scale": one}),  # A already fp8
        (case.x, {}),  # no scale
        (case.x, {"a_scale": torch.ones(4, 1, device=device)}),  # per-token
        (case.x, {"a_scale": one, "per_channel": True}),
        (case.x, {"a_scale": one, "quant": "int8_w8a8"}),
    ]
    for a, extra in bad:
        with pytest.raises(ValueError, match="quant_a needs"):
            launch.invoke_moe_gemm(a, case.w1, out, routing, **{**kw, **extra})


def test_compile_only_builds_the_kernel_the_op_launches(device, monkeypatch):
    """Compile processes must build GEMM1 with QUANT_A (and A in the compute dtype) when the op
    will launch it, or every candidate compiles twice."""
    seen = record_launches_and_warmups(monkeypatch)
    monkeypatch.setattr(ops, "QUANT_A_IN_GEMM1_MAX_M", 64)
    case = _case(16, device)
    ops.fused_experts(*case.args(), config=SMALL, **case.kwargs)
    with compile_only():
        ops.fused_experts(*case.args(), config=SMALL, **case.kwargs)
    assert len(seen["warmup"]) == 2 and seen["warmup"] == seen["launch"]
    types, gemm1, _ = seen["warmup"][0]
    assert gemm1["QUANT_A"] is True and types[0] == "torch.float16"


@pytest.mark.parametrize(
    ("qa_max", "sizes"),
    [
        pytest.param(None, [16, 65], id="off"),
        pytest.param(64, [16, 65], id="at-the-fuse-limit"),
        pytest.param(8, [8, 16, 65], id="below-16"),
        pytest.param(100, [16, 65, 101], id="above-65"),
        pytest.param(1 << 30, [16, 65], id="every-M"),
    ],
)
def test_compile_inputs_cover_both_sides_of_the_limit(qa_max, sizes, monkeypatch):
    from moetune.precompile import compile_inputs
    from moetune.problem import Problem

    monkeypatch.setattr(ops, "QUANT_A_IN_GEMM1_MAX_M", qa_max)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", 64)
    problem = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
    sets = compile_inputs(problem, "cpu", torch.float8_e4m3fn, "static")
    assert [args[0].shape[0] for args, _ in sets] == sizes
    dynamic = compile_inputs(problem, "cpu", torch.float8_e4m3fn, "dynamic")
    assert [args[0].shape[0] for args, _ in dynamic] == [16], "dynamic scales never take it"


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("M", [1, 64, 300])
def test_quantizing_in_gemm1_bf16_gpu(M, activation, device, monkeypatch):
    """bf16 (GPU only) on realistic tiles: the same bits as quantizing first, and the check."""
    case = make_case(M, 16, 256, 352, 4, torch.bfloat16, device, quant="fp8_w8a8", bias=True,
                     activation=activation)  # fmt: skip
    scale = 0.8 * float(case.x.float().abs().max()) / 448.0
    case.kwargs.update(a1_scale=torch.tensor([scale], device=device),
                       a2_scale=torch.tensor([0.05], device=device))  # fmt: skip
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8,
              "num_warps": 4, "num_stages": 3}  # fmt: skip
    outs = []
    for qa_max in (None, 1 << 30):
        monkeypatch.setattr(ops, "QUANT_A_IN_GEMM1_MAX_M", qa_max)
        with poisoned_workspace():
            outs.append(fused_experts(*case.args(), config=config, **case.kwargs))
    assert torch.equal(outs[1], outs[0])
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(outs[1], ref, dtype=torch.bfloat16, quant="fp8_w8a8").ok
