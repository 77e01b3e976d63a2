"""The checker and the kernel guard the epilogue-order bug class of 2026 (DESIGN §1).

Inputs are chosen so the order matters: fp8/int8 weights with scales far from 1, biases as large
as the GEMM outputs, router weights in [0.1, 1).
"""

import pytest
import torch
from helpers import make_case

from moetune import check_close, fused_experts, fused_experts_reference
from moetune.check import tolerance

CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
CASES = [
    pytest.param("fp8_w8a8", False, 8.0, id="fp8-tensor-scale×8"),
    pytest.param("fp8_w8a8", True, 0.125, id="fp8-channel-scale×1/8"),
    pytest.param("int8_w8a8", False, 0.25, id="int8-tensor-scale×1/4"),
    pytest.param("int8_w8a8", True, 4.0, id="int8-channel-scale×4"),
]


def _case(quant, per_channel, mult, device, dtype=torch.float16):
    """Scales multiplied by ``mult``; each bias rescaled to its GEMM's output magnitude."""
    case = make_case(
        24, 6, 32, 64, 2, dtype, device, quant=quant, per_channel=per_channel, bias=True,
        w_scale_mult=mult,
    )  # fmt: skip
    kw = dict(case.kwargs)
    no_bias = {k: v for k, v in kw.items() if k not in ("w1_bias", "w2_bias")}
    out = fused_experts_reference(*case.args(), **no_bias).double()
    # GEMM2's per-slot output is about the layer output divided by the summed router weight.
    gemm2_rms = out.pow(2).mean().sqrt() / case.topk_weights.sum(-1).mean()
    gemm1_rms = gemm2_rms.sqrt()  # silu(g)·u is quadratic in GEMM1's output
    kw["w1_bias"] = (kw["w1_bias"].double() * gemm1_rms).to(dtype)
    kw["w2_bias"] = (kw["w2_bias"].double() * gemm2_rms).to(dtype)
    case.kwargs = kw
    return case


@pytest.mark.parametrize(("quant", "per_channel", "mult"), CASES)
@pytest.mark.parametrize("wrong", ["bias-before-dequant", "route-before-bias"])
def test_checker_rejects_wrong_epilogue_orders(quant, per_channel, mult, wrong, device):
    """(a) bias scaled by the dequantization factor; (b) bias escaping the router weight."""
    case = _case(quant, per_channel, mult, device)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    mutant = fused_experts_reference(*case.args(), epilogue=wrong, **case.kwargs)
    result = check_close(mutant, ref, dtype=torch.float16, quant=quant)
    assert not result.ok, f"{wrong} passed the checker: {result}"
    assert result.worst_row_err > 10 * result.tol


@pytest.mark.parametrize(("quant", "per_channel", "mult"), CASES)
def test_kernel_passes_and_is_far_from_the_wrong_orders(quant, per_channel, mult, device):
    case = _case(quant, per_channel, mult, device)
    out = fused_experts(*case.args(), config=CFG, **case.kwargs)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16, quant=quant).ok
    for wrong in ("bias-before-dequant", "route-before-bias"):
        mutant = fused_experts_reference(*case.args(), epilogue=wrong, **case.kwargs)
        far = check_close(out, mutant, dtype=torch.float16, quant=quant)
        assert not far.ok and far.worst_row_err > 3 * tolerance(torch.float16, quant), (wrong, far)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_before_route_is_a_sub_ulp_double_rounding(dtype, device):
    """(c) cast to the compute dtype before the router multiply: a second rounding.

    What it does: each slot's element moves by at most about one unit in the last place of the
    output dtype before the sum over top-k, so the row error is of the order of the unit roundoff
    u (measured: ~1e-4 at float16, ~4e-3 at bfloat16) and the 4u tolerance that a correct kernel
    needs cannot see it. It is still a real change of result (some elements differ). The
    reference alone runs here, so bfloat16 is fine on CPU.
    """
    case = make_case(64, 6, 32, 64, 2, dtype, device, bias=True, bias_mult=2.0)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    mutant = fused_experts_reference(*case.args(), epilogue="cast-before-route", **case.kwargs)
    result = check_close(mutant, ref, dtype=dtype)
    u = torch.finfo(dtype).eps / 2
    assert not torch.equal(mutant, ref), "the mutation changed nothing: test inputs too tame"
    assert 0 < result.worst_row_err < 4 * u, result
    assert result.ok
