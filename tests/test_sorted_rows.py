"""Rows in the routing's sorted order (ops.SORTED_MIN_M, ops.SORTED_INPUT_MIN_M): GEMM1 storing
its output at sorted positions for GEMM2 to read as contiguous blocks, and the input gathered
into sorted positions for GEMM1, through TMA where the GPU has it. The op's output must be the
default layout's bit for bit in every mode that takes them, and the modes that cannot must keep
the slot layout."""

import pytest
import torch
from helpers import make_case, mode_case, record_launches, static_scales

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.align import moe_align_block_size_torch
from moetune.gather import gather_sorted, gather_sorted_torch
from moetune.ops import capture_requantized, poisoned_workspace

TMA_HERE = not torch.cuda.is_available() or (
    torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9
)
NOUT, K = 48, 80
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
# (quant, per_channel, block_shape, static activation scales, whether GEMM2 reads sorted rows)
MODES = [
    pytest.param(None, False, None, False, True, id="fp16"),
    pytest.param("int8_w8a16", False, None, False, True, id="int8_w8a16"),
    pytest.param("fp8_w8a8", False, None, True, True, id="fp8-static"),
    pytest.param("fp8_w8a8", False, (32, 32), False, True, id="fp8-block"),
    # a dynamic per-tensor scale would take in the padded rows; per-token scales stay by slot
    pytest.param("fp8_w8a8", False, None, False, False, id="fp8-dynamic"),
    pytest.param("fp8_w8a8", True, None, False, False, id="fp8-token"),
    pytest.param("int8_w8a8", False, None, True, True, id="int8-static"),
    pytest.param("int8_w8a8", False, (32, 32), False, True, id="int8-block"),
]


def _run(case, monkeypatch, *, mid, inp, tma=True, expert_map=None, config=CONFIG,
         config_down=None, tma_min_block_m=16):  # fmt: skip
    monkeypatch.setattr(ops, "SORTED_MIN_M", 1 if mid else None)
    monkeypatch.setattr(ops, "SORTED_INPUT_MIN_M", 1 if inp else None)
    monkeypatch.setattr(launch, "SORTED_TMA", tma)
    monkeypatch.setattr(launch, "WEIGHTS_TMA", tma)
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", tma_min_block_m)
    kwargs = dict(case.kwargs)
    if expert_map is not None:
        kwargs["expert_map"] = expert_map
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, config_down=config_down, **kwargs)


@pytest.mark.skipif(not TMA_HERE, reason="this GPU has no TMA (NVIDIA sm90+)")
@pytest.mark.parametrize(("quant", "per_channel", "block_shape", "static", "mid"), MODES)
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_sorted_rows_change_no_bit(quant, per_channel, block_shape, static, mid, fuse,
                                   activation, device, monkeypatch):  # fmt: skip
    case = mode_case(19, 5, NOUT, K, device, quant=quant, per_channel=per_channel,
                     block_shape=block_shape, static=static, activation=activation)  # fmt: skip
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    launches = record_launches(monkeypatch, run=True)
    slots = _run(case, monkeypatch, mid=False, inp=False)
    assert not any(k["A_SORTED"] or k["C_SORTED"] for k in launches)
    launches.clear()
    out = _run(case, monkeypatch, mid=True, inp=True)
    up, down = launches[0], launches[-1]
    assert up["A_SORTED"] and up["A_TMA"]  # the input's gathered rows, through TMA
    assert up["C_SORTED"] is mid and down["A_SORTED"] is mid and down["A_TMA"] is mid
    assert not down["C_SORTED"]
    assert not torch.isnan(out).any()
    assert torch.equal(out, slots)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16, quant=quant).ok


@pytest.mark.skipif(not TMA_HERE, reason="this GPU has no TMA (NVIDIA sm90+)")
@pytest.mark.parametrize("tma", [False, True])
def test_sorted_rows_with_pointer_loads_and_another_ranks_experts(tma, device, monkeypatch):
    """Sorted rows on pointer loads too; experts of another rank (expert id -1 blocks) still
    contribute zero."""
    case = make_case(23, 6, NOUT, K, 3, torch.float16, device, bias=True, exact_dots=True)
    expert_map = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32, device=device)
    launches = record_launches(monkeypatch, run=True)
    slots = _run(case, monkeypatch, mid=False, inp=False, expert_map=expert_map)
    launches.clear()
    out = _run(case, monkeypatch, mid=True, inp=True, tma=tma, expert_map=expert_map)
    assert [k["A_SORTED"] for k in launches] == [True, True]
    assert [k["A_TMA"] for k in launches] == [tma, tma]
    assert torch.equal(out, slots)


def test_no_sorted_rows_for_direct_slots_or_other_down_tiles(device, monkeypatch):
    """One token takes direct slots; down tiles of another BLOCK_SIZE_M pad otherwise: both
    keep the slot layout between the GEMMs."""
    case = make_case(1, 4, NOUT, K, 2, torch.float16, device)
    launches = record_launches(monkeypatch, run=True)
    _run(case, monkeypatch, mid=True, inp=True)
    assert not any(k["A_SORTED"] or k["C_SORTED"] for k in launches)
    case = make_case(9, 4, NOUT, K, 2, torch.float16, device)
    launches.clear()
    monkeypatch.setattr(ops, "SORTED_MIN_M", 1)
    monkeypatch.setattr(ops, "SORTED_INPUT_MIN_M", None)
    with poisoned_workspace():
        out = fused_experts(*case.args(), config=CONFIG,
                            config_down=dict(CONFIG, BLOCK_SIZE_M=32), **case.kwargs)  # fmt: skip
    assert [k["C_SORTED"] for k in launches] == [False, False]
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok


def test_sorted_rows_with_the_sum_over_topk_in_gemm2(device, monkeypatch):
    """GEMM2 reads sorted rows and adds each slot into its token's fp32 row: the same result
    as the slot layout with the same sum (up to fp32's addition order: top-2 sums commute)."""
    case = make_case(21, 5, NOUT, K, 2, torch.float16, device, bias=True, exact_dots=True)
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", 1)
    launches = record_launches(monkeypatch, run=True)
    slots = _run(case, monkeypatch, mid=False, inp=False, tma=False)
    launches.clear()
    out = _run(case, monkeypatch, mid=True, inp=True, tma=False)
    assert launches[1]["A_SORTED"] and launches[1]["SUM_TOPK"] == 2
    assert torch.equal(out, slots)


def test_compile_processes_build_the_sorted_kernels(monkeypatch):
    """With the switches set, compile processes run a set of that many tokens."""
    from moetune.precompile import compile_inputs
    from moetune.problem import Problem

    problem = Problem(E=4, N=32, K=64, topk=2)

    def sizes(max_m=None):
        sets = compile_inputs(problem, "cpu", torch.float8_e4m3fn, max_m=max_m)
        return sorted(a[0].shape[0] for a, _ in sets)

    monkeypatch.setattr(ops, "SORTED_MIN_M", None)
    monkeypatch.setattr(ops, "SORTED_INPUT_MIN_M", None)
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", None)
    assert max(sizes()) < 64
    monkeypatch.setattr(ops, "SORTED_MIN_M", 64)
    assert max(sizes()) == 64
    monkeypatch.setattr(ops, "SORTED_INPUT_MIN_M", 96)
    assert 64 in sizes() and 96 in sizes()
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", 128)
    assert 128 in sizes()  # the rule takes an unquantized top-2 problem
    assert 128 in sizes(max_m=128)
    assert 128 not in sizes(max_m=127)  # a sweep that never reaches the rule's batch sizes
    problem = Problem(E=4, N=32, K=64, topk=3)
    assert 128 not in sizes()
    problem = Problem(E=4, N=32, K=64, topk=2, quant="int8_w8a16")
    assert 128 not in sizes()


def _auto(case, monkeypatch, limit, config_down=None, tma_min_block_m=16):
    """The op with only SORTED_AUTO_MIN_M's rule (at ``limit``) able to sort rows."""
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", limit)
    return _run(case, monkeypatch, mid=False, inp=False, config_down=config_down,
                tma_min_block_m=tma_min_block_m)  # fmt: skip


@pytest.mark.skipif(not TMA_HERE, reason="this GPU has no TMA (NVIDIA sm90+)")
def test_the_rule_sorts_an_unquantized_top2_op_from_its_limit(device, monkeypatch):
    """From SORTED_AUTO_MIN_M tokens an unquantized op of top-k <= 2 gathers its input into
    sorted positions and hands GEMM2 sorted rows, with the slot layout's bits; below the limit,
    at top-3, quantized (weights only, too) or with down tiles of another height it does not."""
    launches = record_launches(monkeypatch, run=True)

    def sorted_launches(case, limit, config_down=None, tma_min_block_m=16):
        launches.clear()
        out = _auto(case, monkeypatch, limit, config_down, tma_min_block_m)
        return [(k["A_SORTED"], k["C_SORTED"]) for k in launches], out

    case = make_case(19, 5, NOUT, K, 2, torch.float16, device, bias=True, exact_dots=True)
    slots = _auto(case, monkeypatch, None)
    layout, out = sorted_launches(case, 19)
    assert layout == [(True, True), (True, False)]
    assert torch.equal(out, slots)
    assert sorted_launches(case, 20)[0] == [(False, False)] * 2
    down = dict(CONFIG, BLOCK_SIZE_M=32)
    assert sorted_launches(case, 19, down)[0] == [(False, False)] * 2
    top3 = make_case(19, 5, NOUT, K, 3, torch.float16, device)
    w8a16 = make_case(19, 5, NOUT, K, 2, torch.float16, device, quant="int8_w8a16")
    for other in (top3, w8a16):
        assert sorted_launches(other, 19)[0] == [(False, False)] * 2
    # rows that would not load through TMA: tiles under its minimum height, or no TMA at all
    assert sorted_launches(case, 19, tma_min_block_m=32)[0] == [(False, False)] * 2
    with monkeypatch.context() as m:
        m.setattr(launch, "TensorDescriptor", None)
        assert sorted_launches(case, 19)[0] == [(False, False)] * 2


def test_the_rule_needs_tma(monkeypatch):
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", 1024)

    def yes():
        return True

    def no():
        return False

    assert ops.sorted_auto(4096, 2, quant=None, same_block_m=True, tma=yes)
    assert not ops.sorted_auto(4096, 2, quant=None, same_block_m=True, tma=no)
    assert not ops.sorted_auto(4096, 2, quant="fp8_w8a8", same_block_m=True, tma=yes)
    assert not ops.sorted_auto(1023, 2, quant=None, same_block_m=True, tma=yes)

    def asked():
        raise AssertionError("the device was asked where the rule cannot fire")

    assert not ops.sorted_auto(1023, 2, quant=None, same_block_m=True, tma=asked)
    cpu = torch.device("cpu")
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.sorted_rows_tma(cpu, 64, (8192, 28672)) == (launch.TensorDescriptor is not None)
    assert not launch.sorted_rows_tma(cpu, 32, (8192, 28672))  # tiles under TMA's minimum
    assert not launch.sorted_rows_tma(cpu, 64, (8192, 28670))  # rows not whole 16-byte units
    monkeypatch.setattr(launch, "SORTED_TMA", False)
    assert not launch.sorted_rows_tma(cpu, 64, (8192, 28672))


def test_the_requantized_input_is_captured_in_slot_order(device, monkeypatch):
    """Checks judge GEMM2 given the operand the op re-quantized: one row a slot, whatever the
    op's layout."""
    case = make_case(13, 4, NOUT, K, 2, torch.float16, device, quant="fp8_w8a8",
                     block_shape=(32, 32))  # fmt: skip
    seen = {}
    launches = record_launches(monkeypatch, run=True)
    for mid in (False, True):
        monkeypatch.setattr(ops, "SORTED_MIN_M", 1 if mid else None)
        launches.clear()
        with capture_requantized() as captured:
            fused_experts(*case.args(), config=CONFIG, **case.kwargs)
        assert launches[0]["C_SORTED"] is mid
        seen[mid] = captured[0]
    assert seen[True][0].shape == seen[False][0].shape
    assert torch.equal(seen[True][0].view(torch.uint8), seen[False][0].view(torch.uint8))
    assert torch.equal(seen[True][1], seen[False][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float8_e4m3fn])
def test_gather_sorted_matches_torch(dtype, device):
    M, topk, E = 37, 3, 6
    ids = torch.randint(0, E, (M, topk), dtype=torch.int32, device=device)
    routing = moe_align_block_size_torch(ids, 16, E)
    x = torch.randn(M, 72, device=device).to(dtype)
    got = gather_sorted(x, routing, topk, M * topk)
    want = gather_sorted_torch(x, routing, topk, M * topk)
    used = int(routing.num_tokens_post_padded)
    assert got.shape == (routing.sorted_token_ids.numel(), 72)
    bits = (lambda t: t.view(torch.uint8)) if dtype.itemsize == 1 else (lambda t: t)
    assert torch.equal(bits(got[:used]), bits(want[:used]))
    # each used position holds its slot's token row, padding zeros
    sorted_ids = routing.sorted_token_ids[:used].long()
    real = sorted_ids < M * topk
    assert torch.equal(bits(got[:used][real]), bits(x[sorted_ids[real] // topk]))
    assert not bits(got[:used][~real]).any()


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "fp8_w8a8", "fp8-block"])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("block_m", [64, 128])
def test_sorted_rows_change_no_bit_gpu(quant, activation, block_m, device, monkeypatch):
    """bf16, static fp8 and block fp8 on realistic tiles (GPU only): sorted rows through TMA
    against the slot layout's pointer loads."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9")
    block = (128, 128) if quant == "fp8-block" else None
    quant = "fp8_w8a8" if quant else None
    case = make_case(600, 8, 384, 512, 4, torch.bfloat16, device, quant=quant, bias=True,
                     block_shape=block, activation=activation)  # fmt: skip
    if quant and block is None:
        case.kwargs.update(static_scales(case))
    warps = 8 if block_m == 128 else 4
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128,
              "GROUP_SIZE_M": 8, "num_warps": warps, "num_stages": 3}  # fmt: skip
    launches = record_launches(monkeypatch, run=True)
    slots = _run(case, monkeypatch, mid=False, inp=False, config=config)
    launches.clear()
    out = _run(case, monkeypatch, mid=True, inp=True, config=config)
    assert [k["A_TMA"] for k in launches] == [True, True]
    assert torch.equal(out, slots)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.bfloat16, quant=quant).ok


@pytest.mark.parametrize(
    "step", ["activation", "activation-fp8", "activation-fp8-rows", "group-fp8", "token-fp8"]
)
def test_steps_between_the_gemms_take_only_live_rows(step, device, monkeypatch):
    """Rows that hold a slot (before the used length, not padding) are the whole tensor's bits,
    the others (NaN here, as unwritten sorted positions may be) do not reach them, and their
    output rows (and scales) are left as allocated: new buffers here hold a byte pattern."""
    from moetune.activation import Tile, apply_activation, apply_activation_quantized
    from moetune.align import LiveRows
    from moetune.quant_kernel import quantize_activation_fast

    T, used, num_slots = 40, 27, 50
    ids = torch.randint(0, num_slots, (T,), dtype=torch.int32, device=device)
    ids[[3, 4, 11, 20]] = num_slots  # padding
    live_rows = torch.zeros(T, dtype=torch.bool, device=device)
    live_rows[:used] = ids[:used] < num_slots
    x = torch.randn(T, 96, device=device).to(torch.float16)
    x[~live_rows] = float("nan")
    live = LiveRows(ids, torch.tensor([used], dtype=torch.int32, device=device), num_slots)
    fp8 = torch.float8_e4m3fn
    empty = torch.empty

    def patterned(*args, **kwargs):
        t = empty(*args, **kwargs)
        t.view(torch.uint8).fill_(0x55)
        return t

    monkeypatch.setattr(torch, "empty", patterned)
    if step == "activation":
        whole, part = (apply_activation(x, "silu", **kw) for kw in ({}, {"live": live}))
    elif step.startswith("activation-fp8"):  # -rows: programs of 8 rows, some live, some not
        scale = torch.full((1,), 0.05, device=device)
        tile = Tile(8, 32, 4, True) if step.endswith("rows") else None
        whole, part = (apply_activation_quantized(x, "swigluoai", fp8, scale, tile=tile, **kw)[0]
                       for kw in ({}, {"live": live}))  # fmt: skip
    else:
        group = 32 if step == "group-fp8" else None
        outs = [quantize_activation_fast(x, fp8, group_k=group, per_token=group is None, **kw)
                for kw in ({}, {"live": live})]  # fmt: skip
        assert torch.equal(outs[0][1][live_rows], outs[1][1][live_rows])
        assert (outs[1][1][~live_rows].view(torch.uint8) == 0x55).all()  # scales left too
        whole, part = outs[0][0], outs[1][0]
    bits = (lambda t: t.view(torch.uint8)) if whole.element_size() == 1 else (lambda t: t)
    assert torch.equal(bits(whole[live_rows]), bits(part[live_rows]))
    assert not torch.isnan(part[live_rows].float()).any()
    assert (part[~live_rows].view(torch.uint8) == 0x55).all()
