"""The activation (and static fp8 re-quantization) in GEMM1's epilogue, ops.FUSE_GEMM1_ACTIVATION:
the op's output must be the unfused steps' bit for bit, in every quantization mode, with both
activations, on tiles whose outputs wrap past N, and with experts on another rank."""

import pytest
import torch
from helpers import make_case, record_launches

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.ops import poisoned_workspace

# N = 36 outputs: neither 16-wide (BLOCK_SIZE_N 32) nor 8-wide (16) tiles divide it.
NOUT = 36
TILES = [
    pytest.param({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1},
                 id="N32"),
    # BLOCK_SIZE_K 32: a GPU's fp8 dot needs K tiles of at least 32.
    pytest.param({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 4},
                 id="N16"),
]  # fmt: skip
MODES = [
    pytest.param(None, False, None, False, id="fp16"),
    pytest.param("int8_w8a16", False, None, False, id="int8_w8a16"),
    pytest.param("fp8_w8a8", False, None, False, id="fp8-tensor-dynamic"),
    pytest.param("fp8_w8a8", False, None, True, id="fp8-tensor-static"),
    pytest.param("fp8_w8a8", True, None, False, id="fp8-token-dynamic"),
    pytest.param("fp8_w8a8", True, None, True, id="fp8-token-static"),
    pytest.param("fp8_w8a8", False, (32, 32), False, id="fp8-block"),
    pytest.param("int8_w8a8", False, None, True, id="int8-tensor-static"),
]


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """The keyword arguments of every fused-MoE kernel launch (which still runs)."""
    return record_launches(monkeypatch, run=True)


# "silu-pairs": silu with gate and up rows interleaved in the tile (launch.SILU_PAIRS).
ACTIVATIONS = ["silu", "silu-pairs", "swigluoai"]


def _activation(name: str, monkeypatch) -> str:
    """The op's activation for a test name, with launch.SILU_PAIRS set to match."""
    monkeypatch.setattr(launch, "SILU_PAIRS", name == "silu-pairs")
    return "silu" if name == "silu-pairs" else name


def _case(quant, per_channel, block_shape, static, activation, device, M=19, E=5):
    # exact_dots: the interpreter's tl.dot may round a column differently at another place in
    # the tile (it is numpy's matmul), and the fused tile moves silu's columns; with values whose
    # dot products are exact in fp32 only the kernel's own arithmetic can make a difference.
    case = make_case(M, E, NOUT, 72, 2, torch.float16, device, quant=quant,
                     per_channel=per_channel, block_shape=block_shape, bias=True,
                     activation=activation, exact_dots=True)  # fmt: skip
    if static:  # calibrated on this case, as a checkpoint's static scales are
        from moetune.inputs import static_activation_scales

        kw = {k: v for k, v in case.kwargs.items() if k != "per_channel_quant"}
        scales = static_activation_scales(case.args(), kw)
        if per_channel:  # one scale per token (a1) and per slot (a2), none below the tensor's
            scales["a1_scale"] = scales["a1_scale"] * (1 + torch.rand(M, 1, device=device))
            scales["a2_scale"] = scales["a2_scale"] * (1 + torch.rand(M * 2, 1, device=device))
        case.kwargs.update(scales)
    return case


def _run(case, config, *, fuse: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", None)  # test_static_fp8_limit
    monkeypatch.setattr(ops, "FUSE_ACTIVATION_QUANT", False)  # the unfused steps: three launches
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, **case.kwargs)


# Every mode on 16-output tiles; the 8-output tiles (the narrowest a config allows) with the
# plain and the static fp8 epilogue.
CASES = [pytest.param(*m.values, TILES[0].values[0], id=f"{m.id}-N32") for m in MODES] + [
    pytest.param(*m.values, TILES[1].values[0], id=f"{m.id}-N16")
    for m in MODES
    if m.id in ("fp16", "fp8-tensor-static")
]


@pytest.mark.parametrize(("quant", "per_channel", "block_shape", "static", "config"), CASES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_fused_epilogue_changes_no_bit(
    quant, per_channel, block_shape, static, config, name, device, monkeypatch, launches
):
    activation = _activation(name, monkeypatch)
    case = _case(quant, per_channel, block_shape, static, activation, device)
    steps = _run(case, config, fuse=False, monkeypatch=monkeypatch)
    assert [k["ACTIVATION"] for k in launches] == [0, 0]
    launches.clear()
    fused = _run(case, config, fuse=True, monkeypatch=monkeypatch)
    up, down = launches
    assert up["ACTIVATION"] == launch.ACTIVATION_CODES[activation] and down["ACTIVATION"] == 0
    assert up["SILU_PAIRS"] == (name == "silu-pairs") and not down["SILU_PAIRS"]
    # Only a static fp8 scale is applied in the epilogue; the other modes quantize afterwards.
    assert up["QUANT_OUT"] == (quant == "fp8_w8a8" and static)
    assert up["PER_ROW_SCALE"] == (up["QUANT_OUT"] and per_channel)
    assert torch.equal(fused, steps)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(fused, ref, dtype=torch.float16, quant=quant)
    assert result.ok, result


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gate_and_up_columns_are_not_swapped(name, device, monkeypatch):
    """A fused epilogue that paired the wrong columns (gate with gate, or the halves swapped)
    would still give finite numbers: the reference must tell them apart. Swapping gate and up in
    the weights must change the op's output, and the op must follow the reference both ways."""
    activation = _activation(name, monkeypatch)
    case = _case(None, False, None, False, activation, device)
    config = TILES[0].values[0]
    out = _run(case, config, fuse=True, monkeypatch=monkeypatch)
    w1 = case.w1
    if activation == "silu":
        swapped = torch.cat([w1[:, NOUT:], w1[:, :NOUT]], dim=1)
        bias = case.kwargs["w1_bias"]
        case.kwargs["w1_bias"] = torch.cat([bias[:, NOUT:], bias[:, :NOUT]], dim=1)
    else:
        swapped = w1.view(w1.shape[0], NOUT, 2, -1).flip(2).reshape(w1.shape)
        bias = case.kwargs["w1_bias"]
        case.kwargs["w1_bias"] = bias.view(bias.shape[0], NOUT, 2).flip(2).reshape(bias.shape)
    case.w1 = swapped.contiguous()
    out_swapped = _run(case, config, fuse=True, monkeypatch=monkeypatch)
    assert not torch.allclose(out, out_swapped, rtol=1e-2, atol=1e-2)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out_swapped, ref, dtype=torch.float16).ok


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_experts_on_another_rank_give_zero(name, device, monkeypatch):
    """Blocks of experts mapped to -1 store the activation of zero (zero) in the fused path too:
    GEMM2's operand rows of those slots are exactly zero, not the poison (GEMM2 would write zero
    for them either way, so only the operand shows it), and tokens routed only to them come out
    as exactly zero."""
    activation = _activation(name, monkeypatch)
    case = _case("fp8_w8a8", False, None, True, activation, device, M=12, E=6)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1], dtype=torch.int32, device=device)
    case.kwargs["expert_map"] = expert_map
    config = TILES[0].values[0]
    remote_slots = expert_map[case.topk_ids.long()].reshape(-1) == -1
    outs = []
    for fuse in (False, True):
        with ops.capture_requantized() as seen:
            outs.append(_run(case, config, fuse=fuse, monkeypatch=monkeypatch))
        ((a2, _),) = seen
        assert bool(remote_slots.any()) and bool((a2[remote_slots].float() == 0).all())
    steps, fused = outs
    assert torch.equal(fused, steps)
    remote_only = (expert_map[case.topk_ids.long()] == -1).all(dim=1)
    assert bool((fused[remote_only] == 0).all())


def test_an_fp8_output_needs_its_activation_and_scale(device):
    """The launcher refuses the combinations the kernel cannot honour."""
    from moetune.align import moe_align_block_size_torch

    case = make_case(4, 2, 16, 32, 1, torch.float16, device)
    routing = moe_align_block_size_torch(case.topk_ids, 16, 2, None)
    config = TILES[1].values[0]
    out = torch.empty(4, 16, dtype=torch.float8_e4m3fn, device=device)
    with pytest.raises(ValueError, match="fp8 output"):
        launch.invoke_moe_gemm(case.x, case.w1, out, routing, config=config, top_k=1,
                               compute_dtype=torch.float16, activation="silu")  # fmt: skip
    with pytest.raises(ValueError, match="N/2"):
        launch.invoke_moe_gemm(case.x, case.w1, torch.empty(4, 32, device=device,
                               dtype=torch.float16), routing, config=config, top_k=1,
                               compute_dtype=torch.float16, activation="silu")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("quant", "static"), [(None, False), ("fp8_w8a8", True),
                                               ("fp8_w8a8", False)])  # fmt: skip
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_fused_epilogue_changes_no_bit_bf16_gpu(quant, static, name, block_m, device,
                                                 monkeypatch):  # fmt: skip
    """bf16 (GPU only) on realistic tiles: the epilogue's casts and activation arithmetic are
    compiled into another kernel than the activation kernel's, with the same bits."""
    activation = _activation(name, monkeypatch)
    # 352 outputs: the 64-output tiles wrap.
    case = make_case(300, 8, 352, 512, 2, torch.bfloat16, device, quant=quant, bias=True,
                     activation=activation)  # fmt: skip
    if static:
        from moetune.inputs import static_activation_scales

        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    warps = 8 if block_m == 128 else 4
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128,
              "GROUP_SIZE_M": 8, "num_warps": warps, "num_stages": 3}  # fmt: skip
    steps = _run(case, config, fuse=False, monkeypatch=monkeypatch)
    fused = _run(case, config, fuse=True, monkeypatch=monkeypatch)
    assert torch.equal(fused, steps)


@pytest.mark.parametrize(
    ("quant", "static"),
    [(None, False), ("fp8_w8a8", False), ("fp8_w8a8", True), ("int8_w8a8", True)],
    ids=["fp16", "fp8-dynamic", "fp8-static", "int8-static"],
)
def test_static_fp8_limit(quant, static, device, monkeypatch, launches):
    """Above ops.FUSE_GEMM1_STATIC_FP8_MAX_M tokens a static fp8 scale takes the separate
    activation + quantization launch; at or below it, and in every other mode at any M, the
    epilogue applies the activation. The answer is the same bits either way."""
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", True)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", 12)
    config = TILES[0].values[0]
    outs = []
    for M in (12, 13):
        case = _case(quant, False, None, static, "silu", device, M=M)
        launches.clear()
        with poisoned_workspace():
            out = fused_experts(*case.args(), config=config, **case.kwargs)
        fused = not (quant == "fp8_w8a8" and static and M > 12)
        assert ops.fuse_gemm1(M, quant == "fp8_w8a8" and static) == fused
        assert [k["ACTIVATION"] for k in launches] == [1 if fused else 0, 0], M
        assert launches[0]["QUANT_OUT"] == (fused and quant == "fp8_w8a8" and static)
        ref = fused_experts_reference(*case.args(), **case.kwargs)
        assert check_close(out, ref, dtype=torch.float16, quant=quant).ok
        outs.append((case, out))
    if quant == "fp8_w8a8" and static:  # M=13 ran unfused: the fused epilogue gives the same bits
        case, out = outs[1]
        monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", None)
        launches.clear()
        with poisoned_workspace():
            again = fused_experts(*case.args(), config=config, **case.kwargs)
        assert launches[0]["QUANT_OUT"] and torch.equal(again, out)
