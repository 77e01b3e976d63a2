"""Block quantization's weight scales, one per tile (launch.BLOCK_SCALE_PER_TILE): where a
tile's columns share one N-group the kernel loads that group's scale, not a vector of them. The
output must be the vector path's bit for bit and pass the reference; tiles that straddle groups
must keep the vector path."""

import pytest
import torch
from helpers import make_case, record_launches

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.launch import ACTIVATION_CODES, block_scale_per_tile
from moetune.ops import poisoned_workspace

SILU, SWIGLU = ACTIVATION_CODES["silu"], ACTIVATION_CODES["swigluoai"]


def test_rule_plain_and_swiglu_tiles_need_a_tile_that_divides_the_group():
    assert block_scale_per_tile((128, 128), 0, False, 2048, 128)
    assert block_scale_per_tile((128, 128), 0, False, 2048, 64)
    assert not block_scale_per_tile((128, 128), 0, False, 2048, 256)  # two groups a tile
    assert block_scale_per_tile((128, 128), SWIGLU, False, 768, 32)
    assert not block_scale_per_tile(None, 0, False, 2048, 64)
    assert not block_scale_per_tile((96, 128), 0, False, 960, 64)  # 64 does not divide 96


def test_rule_silu_needs_tma_halves_and_a_whole_group_offset_to_the_up_rows():
    assert block_scale_per_tile((128, 128), SILU, True, 768, 256)  # halves of 128
    assert not block_scale_per_tile((128, 128), SILU, False, 768, 64)  # gate | up in one tile
    assert not block_scale_per_tile((128, 128), SILU, True, 768, 512)  # halves of 256
    # gpt-oss-like: 1440 outputs are not whole 128-groups, so an up half may straddle two
    assert not block_scale_per_tile((128, 128), SILU, True, 2880, 64)


def test_rule_switch_off(monkeypatch):
    monkeypatch.setattr(launch, "BLOCK_SCALE_PER_TILE", False)
    assert not block_scale_per_tile((128, 128), 0, False, 2048, 64)


# 128 outputs (GEMM1: 256 rows, up rows 128 on: two 64-groups) and a hidden size of 80, whose
# last 64-column GEMM2 tile and last 32-deep K group run past it.
NOUT, K = 128, 80
BLOCK = (64, 32)


def _run(case, config, *, per_tile: bool, fuse: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(launch, "BLOCK_SCALE_PER_TILE", per_tile)
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, **case.kwargs)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "steps"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_one_scale_per_tile_changes_no_bit(activation, fuse, tma, device, monkeypatch):
    case = make_case(21, 4, NOUT, K, 2, torch.float16, device, quant="fp8_w8a8",
                     block_shape=BLOCK, bias=True, activation=activation)  # fmt: skip
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    monkeypatch.setattr(launch, "WEIGHTS_TMA", tma)
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", 16)
    launches = record_launches(monkeypatch, run=True)
    vector = _run(case, config, per_tile=False, fuse=fuse, monkeypatch=monkeypatch)
    assert not any(k["B_SCALE_PER_TILE"] for k in launches)
    launches.clear()
    per_tile = _run(case, config, per_tile=True, fuse=fuse, monkeypatch=monkeypatch)
    flags = [k["B_SCALE_PER_TILE"] for k in launches]
    b_tma = launches[0]["B_TMA"]
    # GEMM1's tile is one group unless it is silu's gate | up tile on pointer loads.
    gemm1 = not (fuse and activation == "silu" and not b_tma)
    assert flags == [gemm1, True]
    assert not torch.isnan(per_tile).any()
    assert torch.equal(per_tile, vector)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(per_tile, ref, dtype=torch.float16, quant="fp8_w8a8")
    assert result.ok, result


def test_the_cases_scales_differ_between_groups(device, monkeypatch):
    """The bit test above can fail: these cases' N-groups have scales that matter, so a tile
    reading another group's scale changes the output (GEMM2's two groups swapped here)."""
    case = make_case(21, 4, NOUT, K, 2, torch.float16, device, quant="fp8_w8a8",
                     block_shape=BLOCK, bias=True)  # fmt: skip
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    good = _run(case, config, per_tile=True, fuse=True, monkeypatch=monkeypatch)
    # Swap GEMM2's two N-groups' scales: a kernel reading the other group's scale for a tile
    # would produce this output.
    w2s = case.kwargs["w2_scale"]
    case.kwargs["w2_scale"] = w2s[:, [1, 0], :].contiguous()
    swapped = _run(case, config, per_tile=True, fuse=True, monkeypatch=monkeypatch)
    assert not torch.equal(good, swapped)
