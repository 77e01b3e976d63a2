"""The check follows the op's re-quantization between the GEMMs where it was a valid rounding
(``Reference.matching``), and nowhere else.

An "op" here is the reference's own activation moved by a small relative amount (what a correct
kernel's fp32 or fp8 accumulation and bf16 roundings do), re-quantized, and put through an
independent float64 GEMM2: flips at rounding midpoints then move whole rows of the plain check,
while the matching reference follows them exactly. A larger error must still show.
"""

import pytest
import torch
from helpers import make_case

from moetune.check import check_close, check_op
from moetune.ops import fused_experts
from moetune.quant import dequantize_activation, dequantize_weight, quantize_activation
from moetune.reference import REQUANT_ETA, Reference

MODES = [
    pytest.param("fp8_w8a8", False, None, False, id="fp8-tensor-dynamic"),
    pytest.param("fp8_w8a8", False, None, True, id="fp8-tensor-static"),
    pytest.param("fp8_w8a8", True, None, False, id="fp8-token"),
    pytest.param("fp8_w8a8", False, (32, 32), False, id="fp8-block"),
    pytest.param("int8_w8a8", False, None, False, id="int8-tensor"),
    pytest.param("int8_w8a8", True, None, False, id="int8-token"),
]
DT = torch.float16


def _case(quant, per_channel, block_shape, static, M=64):
    case = make_case(M, 4, 64, 64, 2, DT, "cpu", quant=quant, per_channel=per_channel,
                     block_shape=block_shape, bias=True)  # fmt: skip
    if static:
        case.kwargs["a1_scale"] = torch.tensor([0.02])
        case.kwargs["a2_scale"] = torch.tensor([0.01])
    return case


def _requantize(case, ref, h):
    kw = case.kwargs
    return quantize_activation(
        h, case.w1.dtype, scale=kw.get("a2_scale"), per_token=kw.get("per_channel_quant", False),
        group_k=kw["block_shape"][1] if "block_shape" in kw else None,
    )  # fmt: skip


def _gemm2(case, a2, a2s):
    """An independent float64 GEMM2 + epilogue (dequantize, + bias, × router weight, cast) and the
    sum over top-k, from a given re-quantized activation."""
    kw = case.kwargs
    block = kw.get("block_shape")
    a = dequantize_activation(a2, a2s, block[1] if block else None)  # [M·topk, N]
    w = dequantize_weight(case.w2, kw["w2_scale"], tuple(block) if block else None)
    if kw.get("per_channel_quant") and not block:
        w = case.w2.double() * kw["w2_scale"].double().unsqueeze(-1)
    M, topk = case.topk_ids.shape
    e = case.topk_ids.reshape(-1).long()
    y = torch.einsum("sn,skn->sk", a, w[e]) + kw["w2_bias"].double()[e]
    y = (y * case.topk_weights.reshape(-1, 1).double()).to(DT)
    return y.view(M, topk, -1).double().sum(dim=1).to(DT)


def _nudged(h, rel, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(h.shape, generator=g, dtype=torch.float64) * 2 - 1) * rel
    return (h.double() * (1 + delta)).to(h.dtype)


@pytest.mark.parametrize("quant,per_channel,block_shape,static", MODES)
def test_its_own_requantization_gives_the_reference_output(quant, per_channel, block_shape,
                                                           static):  # fmt: skip
    case = _case(quant, per_channel, block_shape, static)
    ref = Reference(*case.args(), **case.kwargs)
    # The same codes and scale as fresh tensors: nothing changed, so nothing is recomputed.
    assert ref.matching((ref.a2.clone(), ref.a2s.clone())) is ref.output


@pytest.mark.parametrize("quant,per_channel,block_shape,static", MODES)
def test_rounding_flips_inside_the_band_are_followed(quant, per_channel, block_shape, static):
    case = _case(quant, per_channel, block_shape, static)
    ref = Reference(*case.args(), **case.kwargs)
    nudge = 2.0**-7  # a bf16 ulp and a half: well inside the band
    assert nudge < REQUANT_ETA / 2
    a2, a2s = _requantize(case, ref, _nudged(ref.h, nudge))
    flipped = int((a2.float() != ref.a2.float()).sum())
    assert flipped > 0, "the nudge flipped nothing: the test shows nothing"
    op_out = _gemm2(case, a2, a2s)
    assert check_close(op_out, ref.matching((a2, a2s)), dtype=DT, tol=1e-3).ok
    plain = check_close(op_out, ref.output, dtype=DT, tol=1e-3)
    assert not plain.ok, "the flips did not move the output: the test shows nothing"


@pytest.mark.parametrize("quant,per_channel,block_shape,static", MODES)
def test_an_activation_error_past_the_band_still_shows(quant, per_channel, block_shape, static):
    """A 25% error in the activation (a wrong scale, a dropped bias) is not a rounding flip."""
    case = _case(quant, per_channel, block_shape, static)
    ref = Reference(*case.args(), **case.kwargs)
    a2, a2s = _requantize(case, ref, (ref.h.double() * 1.25).to(DT))
    if static:  # a static scale does not follow the activation: the codes carry the error
        assert torch.equal(a2s, ref.a2s)
    else:  # a dynamic scale takes it: 25% off is far outside the band, so it is not adopted
        a2s = a2s.clone()
    result = check_close(_gemm2(case, a2, a2s), ref.matching((a2, a2s)), dtype=DT, quant=quant)
    assert not result.ok and result.worst_row_err > 0.1


def test_a_flip_outside_the_band_is_not_followed():
    """An element whose exact value is far from a rounding midpoint has one valid code: a code
    one step away is an error, and the reference keeps its own."""
    case = _case("fp8_w8a8", False, None, True)
    ref = Reference(*case.args(), **case.kwargs)
    q = ref.h.double() / ref.a2s.double()
    code = ref.a2.double()
    # |q - code| small relative to the code spacing: far from the midpoints on either side
    central = ((q - code).abs() < 0.01 * code.abs()) & (code.abs() > 16) & (code.abs() < 256)
    assert central.any()
    r, c = [int(i) for i in central.nonzero()[0]]
    a2 = ref.a2.clone()
    step = 2.0 ** (torch.floor(torch.log2(code[r, c].abs())) - 3)  # e4m3: 3 mantissa bits
    a2[r, c] = (code[r, c] + step * code[r, c].sign()).to(a2.dtype)
    assert float(a2[r, c]) != float(ref.a2[r, c])
    assert torch.equal(ref.matching((a2, ref.a2s)), ref.output)


def test_no_requantization_means_the_plain_output():
    case = make_case(16, 4, 32, 64, 2, DT, "cpu", bias=True)
    ref = Reference(*case.args(), **case.kwargs)
    assert ref.matching((torch.zeros(1), torch.ones(1))) is ref.output
    assert ref.matching(None) is ref.output


def test_a_requantization_of_another_shape_is_an_error():
    case = _case("fp8_w8a8", False, None, False)
    ref = Reference(*case.args(), **case.kwargs)
    with pytest.raises(ValueError, match="does not match"):
        ref.matching((ref.a2[1:], ref.a2s))


def test_check_op_wants_exactly_one_requantization(device):
    """A run that calls the op twice (or not at all) for a w8a8 reference is a harness error, not
    a reason to fall back to the plain reference quietly."""
    case = make_case(8, 4, 32, 64, 2, DT, device, quant="fp8_w8a8")
    ref = Reference(*case.args(), **case.kwargs)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}

    def twice():
        fused_experts(*case.args(), config=cfg, **case.kwargs)
        return fused_experts(*case.args(), config=cfg, **case.kwargs)

    with pytest.raises(ValueError, match="saw 2"):
        check_op(twice, ref, dtype=DT, quant="fp8_w8a8")
    with pytest.raises(ValueError, match="saw 0"):
        check_op(lambda: ref.output.clone(), ref, dtype=DT, quant="fp8_w8a8")


@pytest.mark.parametrize("fuse", ["gemm1-epilogue", "activation-kernel", "none"])
def test_check_op_sees_what_gemm2_consumed(fuse, monkeypatch, device):
    """The real op passes check_op; the same op with a corrupted re-quantized activation (two
    code steps on a few elements, past any rounding band) fails it. Wherever the activation is
    quantized: in GEMM1's epilogue, in the activation kernel, or in a step of its own."""
    from moetune import ops

    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse == "gemm1-epilogue")
    monkeypatch.setattr(ops, "FUSE_ACTIVATION_QUANT", fuse == "activation-kernel")
    case = make_case(24, 4, 32, 64, 2, DT, device, quant="fp8_w8a8", bias=True)
    case.kwargs["a1_scale"] = torch.tensor([0.02], device=device)
    case.kwargs["a2_scale"] = torch.tensor([0.004], device=device)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    ref = Reference(*case.args(), **case.kwargs)

    def run():
        return fused_experts(*case.args(), config=cfg, **case.kwargs)

    good = check_op(run, ref, dtype=DT, quant="fp8_w8a8")
    assert good.ok, good.reason

    real = ops.invoke_moe_gemm

    def corrupt_gemm2(a, w, c, *args, **kw):
        if kw.get("top_k") == 1:  # GEMM2: its operand is the re-quantized activation
            bad = a.float()
            bad[::7, ::5] *= 1.6  # about two e4m3 steps up for the largest codes
            a.copy_(bad.to(a.dtype))
        return real(a, w, c, *args, **kw)

    monkeypatch.setattr(ops, "invoke_moe_gemm", corrupt_gemm2)
    bad = check_op(run, ref, dtype=DT, quant="fp8_w8a8")
    assert not bad.ok


def test_an_int8_code_two_steps_away_is_not_a_flip():
    """On int8's uniform grid the relative band spans several codes for large values; only the
    next code across the rounding boundary is a flip."""
    case = _case("int8_w8a8", False, None, False)
    ref = Reference(*case.args(), **case.kwargs)
    q = ref.h.double() / ref.a2s.double()
    code = ref.a2.double()
    big = (code.abs() > 80) & (code.abs() < 120)
    assert big.any()
    r, c = [int(i) for i in big.nonzero()[0]]
    assert REQUANT_ETA * abs(float(q[r, c])) > 2, "two steps must lie inside the band here"
    a2 = ref.a2.clone()
    a2[r, c] = int(code[r, c] + 2 * code[r, c].sign())
    assert torch.equal(ref.matching((a2, ref.a2s)), ref.output)


@pytest.mark.parametrize("quant,factor", [("int8_w8a8", 1.03), ("fp8_w8a8", 1.1)])
def test_a_scale_off_by_more_than_a_rounding_is_not_adopted(quant, factor):
    """The op quantizes with one scale and hands GEMM2 another: the codes are right, the scale is
    not, and the check must see it."""
    case = _case(quant, False, None, False)
    ref = Reference(*case.args(), **case.kwargs)
    wrong = ref.a2s * factor
    result = check_close(_gemm2(case, ref.a2, wrong), ref.matching((ref.a2, wrong)), dtype=DT,
                         quant=quant)  # fmt: skip
    assert not result.ok


def test_matching_in_blocks_of_rows_gives_the_same_output(monkeypatch):
    """matching() works through large batches a block of rows at a time; the blocks must not
    change which codes are followed."""
    from moetune import reference

    case = _case("fp8_w8a8", True, None, False)
    ref = Reference(*case.args(), **case.kwargs)
    a2, a2s = _requantize(case, ref, _nudged(ref.h, 2.0**-7))
    whole = ref.matching((a2, a2s))
    monkeypatch.setattr(reference, "MATCH_BLOCK", 3 * ref.a2.shape[1])  # 3 rows a block
    assert torch.equal(ref.matching((a2, a2s)), whole)
    assert not torch.equal(whole, ref.output), "nothing was followed: the test shows nothing"
