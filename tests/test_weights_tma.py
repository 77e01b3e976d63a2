"""The weights' tiles through TMA descriptors (launch.WEIGHTS_TMA): the op's output must be the
pointer loads' bit for bit in every quantization mode, activation and fusion, on tiles whose
columns run past N (into the next expert's rows, or past the last expert) and whose last K tile
runs past K (TMA's zero fill), and weights TMA cannot take must fall back to pointer loads."""

import pytest
import torch
from helpers import make_case, record_launches

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.ops import poisoned_workspace

# On a GPU these tests need one that has TMA (the op would take pointer loads elsewhere).
TMA_HERE = not torch.cuda.is_available() or (
    torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9
)
pytestmark = pytest.mark.skipif(not TMA_HERE, reason="this GPU has no TMA (NVIDIA sm90+)")

# N = 48 outputs (GEMM1: 96 rows) and K = 80, rows of whole 16-byte units in every dtype (as
# TMA needs) that 64-wide N tiles, 32-wide silu halves and 32-deep K tiles do not divide.
NOUT, K = 48, 80
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
MODES = [
    pytest.param(None, False, None, id="fp16"),
    pytest.param("int8_w8a16", False, None, id="int8_w8a16"),
    pytest.param("fp8_w8a8", False, None, id="fp8-tensor"),
    pytest.param("fp8_w8a8", True, None, id="fp8-token"),
    pytest.param("fp8_w8a8", False, (32, 32), id="fp8-block"),
    pytest.param("int8_w8a8", False, None, id="int8-tensor"),
]


@pytest.fixture(autouse=True)
def _tma_on_every_tile(monkeypatch):
    """The tests' tiles are 16 rows: TMA from there on, unless a test says otherwise."""
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", 16)


def _run(case, *, tma: bool, fuse: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(launch, "WEIGHTS_TMA", tma)
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=CONFIG, **case.kwargs)


# Every mode with the activation in GEMM1's epilogue (the op's default); the unfused steps (the
# plain GEMM1 tile, no halves) with the plain and the fp8 modes.
CASES = [pytest.param(*m.values, True, id=f"{m.id}-fused") for m in MODES] + [
    pytest.param(*m.values, False, id=f"{m.id}-steps")
    for m in MODES
    if m.id in ("fp16", "fp8-tensor")
]


@pytest.mark.parametrize(("quant", "per_channel", "block_shape", "fuse"), CASES)
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_tma_changes_no_bit(quant, per_channel, block_shape, fuse, activation, device,
                            monkeypatch):  # fmt: skip
    # exact_dots: the silu tile splits into gate and up halves under TMA, and the interpreter's
    # tl.dot (numpy) may round a column differently at another place in a tile.
    case = make_case(19, 5, NOUT, K, 2, torch.float16, device, quant=quant,
                     per_channel=per_channel, block_shape=block_shape, bias=True,
                     activation=activation, exact_dots=True)  # fmt: skip
    launches = record_launches(monkeypatch, run=True)
    pointers = _run(case, tma=False, fuse=fuse, monkeypatch=monkeypatch)
    assert not any(k["B_TMA"] for k in launches)
    launches.clear()
    tma = _run(case, tma=True, fuse=fuse, monkeypatch=monkeypatch)
    assert [k["B_TMA"] for k in launches] == [True, True]
    # Under TMA silu's fused tile is the (gate, up) pairs' one.
    up = launches[0]
    assert up["SILU_PAIRS"] == (fuse and activation == "silu")
    assert not torch.isnan(tma).any()
    assert torch.equal(tma, pointers)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(tma, ref, dtype=torch.float16, quant=quant)
    assert result.ok, result


def test_the_last_experts_tail_tile_is_the_pointer_loads(device, monkeypatch):
    """Every token routed to the last expert, whose last N tile runs past the end of the
    weights (TMA fills zeros there, pointer loads wrap): the same bits either way."""
    case = make_case(8, 3, NOUT, K, 1, torch.float16, device, bias=True, exact_dots=True)
    case.topk_ids.fill_(2)
    pointers = _run(case, tma=False, fuse=True, monkeypatch=monkeypatch)
    tma = _run(case, tma=True, fuse=True, monkeypatch=monkeypatch)
    assert torch.equal(tma, pointers)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(tma, ref, dtype=torch.float16).ok


def test_weights_tma_only_where_tma_can_load(device, monkeypatch):
    w = torch.zeros(2, 64, 72, dtype=torch.float16, device=device)
    monkeypatch.setattr(launch, "WEIGHTS_TMA", False)
    assert not launch.weights_tma(w, 64, 64, 32)  # off
    monkeypatch.setattr(launch, "WEIGHTS_TMA", True)
    assert launch.weights_tma(w, 64, 64, 32)
    assert not launch.weights_tma(w.transpose(1, 2), 64, 64, 32)  # K not contiguous
    # rows of 70 halves: 140 bytes, not whole 16-byte units
    w70 = torch.zeros(2, 64, 70, dtype=torch.float16, device=device)
    assert not launch.weights_tma(w70, 64, 64, 32)
    # an 8-byte K tile (int8, BLOCK_SIZE_K 8 is below any config, but the rule is TMA's)
    w8 = torch.zeros(2, 64, 64, dtype=torch.int8, device=device)
    assert not launch.weights_tma(w8, 64, 64, 8)
    # TMA copies at most 256 rows or columns a side (a restricted space may ask for 512)
    assert not launch.weights_tma(w, 64, 512, 32) and not launch.weights_tma(w, 64, 64, 512)
    # tiles below the row threshold (decode's) keep pointer loads
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", 64)
    assert launch.weights_tma(w, 64, 64, 32) and not launch.weights_tma(w, 32, 64, 32)


def test_default_takes_tma_from_64_rows(device, monkeypatch):
    """The op's default (the fixture aside): 16-row tiles on pointers, 64-row ones on TMA."""
    monkeypatch.undo()
    assert launch.WEIGHTS_TMA and launch.WEIGHTS_TMA_MIN_BLOCK_M == 64
    case = make_case(70, 4, NOUT, K, 2, torch.float16, device, bias=True)
    launches = record_launches(monkeypatch, run=True)
    outs = []
    for block_m in (16, 64):
        with poisoned_workspace():
            config = dict(CONFIG, BLOCK_SIZE_M=block_m)
            outs.append(fused_experts(*case.args(), config=config, **case.kwargs))
    assert [k["B_TMA"] for k in launches] == [False, False, True, True]
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert all(check_close(out, ref, dtype=torch.float16).ok for out in outs)


def test_weights_tma_falls_back_where_tma_cannot_load(device, monkeypatch):
    """w1 with a K of 70 (rows of 140 bytes, not whole 16-byte units) runs on pointer loads;
    w2 (K = 24: 48-byte rows) still on TMA."""
    case = make_case(9, 4, 24, 70, 2, torch.float16, device, bias=True)
    launches = record_launches(monkeypatch, run=True)
    out = _run(case, tma=True, fuse=True, monkeypatch=monkeypatch)
    assert [k["B_TMA"] for k in launches] == [False, True]
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "fp8_w8a8"])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("block_m", [16, 128])
def test_tma_changes_no_bit_bf16_gpu(quant, activation, block_m, device, monkeypatch):
    """bf16 and fp8 on realistic tiles (GPU only): Hopper's TMA loads against pointer loads."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9")
    case = make_case(300, 8, 352, 512, 2, torch.bfloat16, device, quant=quant, bias=True,
                     activation=activation)  # fmt: skip
    warps = 8 if block_m == 128 else 4
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128,
              "GROUP_SIZE_M": 8, "num_warps": warps, "num_stages": 3}  # fmt: skip
    launches = record_launches(monkeypatch, run=True)
    outs = []
    for tma in (False, True):
        monkeypatch.setattr(launch, "WEIGHTS_TMA", tma)
        with poisoned_workspace():
            outs.append(fused_experts(*case.args(), config=config, **case.kwargs))
    assert [k["B_TMA"] for k in launches] == [False, False, True, True]
    assert torch.equal(outs[1], outs[0])
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(outs[1], ref, dtype=torch.bfloat16, quant=quant).ok
