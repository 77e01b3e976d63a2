"""Persistent GEMMs (launch.PERSISTENT_MIN_SLOTS): programs that loop over tiles, the tile loop
flattened with the K loop or not, must give the one-program-a-tile kernel's bits in every mode,
write every tile (the outputs start poisoned), and stay off where the launcher keeps them off
(direct slots, experts on other ranks, GEMMs not named, below the limit)."""

import re

import pytest
import torch
from helpers import compile_for_sm90, make_case, mode_case, record_launches

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.ops import poisoned_workspace

NOUT, K = 48, 80
# 16-row tiles, GROUP_SIZE_M 2: tens of tiles for a few programs, so each program loops.
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}
PROGRAMS = 3
MODES = [
    pytest.param(None, False, None, False, "silu", id="fp16-silu"),
    pytest.param(None, False, None, False, "swigluoai", id="fp16-swigluoai"),
    pytest.param("int8_w8a16", False, None, False, "silu", id="int8_w8a16"),
    pytest.param("fp8_w8a8", False, None, True, "silu", id="fp8-static"),
    pytest.param("fp8_w8a8", True, None, False, "swigluoai", id="fp8-token"),
    pytest.param("fp8_w8a8", False, (32, 32), False, "silu", id="fp8-block"),
]


@pytest.fixture
def few_programs(monkeypatch):
    """A persistent launch of PROGRAMS programs on any device, so each program takes several
    tiles on a GPU too."""
    monkeypatch.setattr(launch, "persistent_programs", lambda device, tiles: min(PROGRAMS, tiles))


def _run(case, monkeypatch, *, persistent, flatten=True, gemms=("up", "down"), config=CONFIG,
         **kwargs):  # fmt: skip
    monkeypatch.setattr(launch, "PERSISTENT_MIN_SLOTS", 1 if persistent else None)
    monkeypatch.setattr(launch, "PERSISTENT_FLATTEN", flatten)
    monkeypatch.setattr(launch, "PERSISTENT_GEMMS", gemms)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, **case.kwargs, **kwargs)


@pytest.mark.parametrize(("quant", "per_channel", "block_shape", "static", "activation"), MODES)
@pytest.mark.parametrize("fuse", [True, False])
def test_persistent_gemms_change_no_bit(quant, per_channel, block_shape, static, activation,
                                        fuse, device, monkeypatch, few_programs):  # fmt: skip
    case = mode_case(37, 6, NOUT, K, device, quant=quant, per_channel=per_channel,
                     block_shape=block_shape, static=static, activation=activation)  # fmt: skip
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", fuse)
    launches = record_launches(monkeypatch, run=True)
    base = _run(case, monkeypatch, persistent=False)
    assert [k["PERSISTENT"] for k in launches] == [0, 0]
    for flatten, mode in ((True, 2), (False, 1)):
        launches.clear()
        out = _run(case, monkeypatch, persistent=True, flatten=flatten)
        assert [k["PERSISTENT"] for k in launches] == [mode, mode]
        assert not torch.isnan(out).any()
        assert torch.equal(out, base)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16, quant=quant).ok


def test_persistent_with_sorted_rows_and_the_sum_in_gemm2(device, monkeypatch, few_programs):
    """Sorted rows through TMA into both GEMMs, and the sum over top-k in GEMM2's epilogue
    (two addends a token: the same bits in any order)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("this GPU has no TMA (NVIDIA sm90+)")
    case = make_case(41, 5, NOUT, K, 2, torch.float16, device, bias=True, exact_dots=True)
    monkeypatch.setattr(ops, "SORTED_MIN_M", 1)
    monkeypatch.setattr(ops, "SORTED_INPUT_MIN_M", 1)
    monkeypatch.setattr(launch, "WEIGHTS_TMA_MIN_BLOCK_M", 16)
    launches = record_launches(monkeypatch, run=True)
    base = _run(case, monkeypatch, persistent=False)
    out = _run(case, monkeypatch, persistent=True)
    assert [(k["A_TMA"], k["PERSISTENT"]) for k in launches[2:]] == [(True, 2), (True, 2)]
    assert torch.equal(out, base)
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", 1)
    launches.clear()
    summed = _run(case, monkeypatch, persistent=True)
    assert [(k["SUM_TOPK"], k["PERSISTENT"]) for k in launches] == [(0, 2), (2, 2)]
    assert torch.equal(summed, base)


def test_blocks_of_other_ranks_are_zero_in_the_persistent_loop(device, monkeypatch,
                                                               few_programs):  # fmt: skip
    """With an expert_map the launcher keeps one program a tile; forced persistent, the loop's
    blocks of experts on other ranks still contribute zero, as the early return does."""
    case = make_case(23, 6, NOUT, K, 3, torch.float16, device, bias=True, exact_dots=True)
    expert_map = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32, device=device)
    launches = record_launches(monkeypatch, run=True)
    base = _run(case, monkeypatch, persistent=False, expert_map=expert_map)
    out = _run(case, monkeypatch, persistent=True, expert_map=expert_map)
    assert [k["PERSISTENT"] for k in launches] == [0, 0, 0, 0]
    monkeypatch.setattr(launch, "persistent_mode", lambda direct, slots, down, remote: 2)
    launches.clear()
    forced = _run(case, monkeypatch, persistent=True, expert_map=expert_map)
    assert [k["PERSISTENT"] for k in launches] == [2, 2]
    assert torch.equal(out, base) and torch.equal(forced, base)


def test_which_launches_are_persistent(device, monkeypatch):
    case = make_case(1, 4, NOUT, K, 2, torch.float16, device)
    launches = record_launches(monkeypatch, run=False)
    _run(case, monkeypatch, persistent=True)  # one token: direct slots
    assert [k["PERSISTENT"] for k in launches] == [0, 0]
    case = make_case(9, 4, NOUT, K, 2, torch.float16, device)
    for gemms, want in ((("up",), [2, 0]), (("down",), [0, 2])):
        launches.clear()
        _run(case, monkeypatch, persistent=True, gemms=gemms)
        assert [k["PERSISTENT"] for k in launches] == want
    monkeypatch.setattr(launch, "PERSISTENT_MIN_SLOTS", 19)  # 18 slots: below the limit
    assert launch.persistent_mode(False, 18, False, False) == 0
    assert launch.persistent_mode(False, 19, True, False) == 2
    assert launch.persistent_mode(False, 19, True, True) == 0  # an expert_map


def test_programs_of_a_persistent_launch():
    cpu = torch.device("cpu")
    assert launch.persistent_programs(cpu, 100) == launch.INTERPRETER_PROGRAMS
    assert launch.persistent_programs(cpu, 2) == 2
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert launch.persistent_programs(torch.device("cuda"), 10**6) == sms


SCRIPT = r"""
launch.PERSISTENT_MIN_SLOTS = 1
launch.PERSISTENT_FLATTEN = sys.argv[1] == "flatten"
config = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=4,
              num_stages=3)
case = make_case(256, 8, 256, 512, 2, torch.bfloat16, "cpu")
with compile_only():
    ops.fused_experts(*case.args(), config=config, **case.kwargs)
for meta in Path(os.environ["TRITON_CACHE_DIR"]).glob("*/fused_moe_kernel.json"):
    print("@@", json.loads(meta.read_text())["name"])
    print(meta.with_suffix(".ttgir").read_text())
"""


def _loops(ttgir: str) -> list[str]:
    """The body of every scf.for, by indentation."""
    lines = ttgir.split("\n")
    bodies = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[i + 1 :]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                break
            body.append(inner)
        bodies.append("\n".join(body))
    return bodies


@pytest.mark.parametrize("flatten", [True, False])
def test_the_loops_flatten_for_hopper(flatten, tmp_path):
    """Compiled for sm90, flattening leaves a loop that holds the MMAs and the epilogue's store
    with no loop inside it: the K loop's bounds must not vary by tile, or Triton keeps the loops
    apart (as it does without flattening)."""
    stdout = compile_for_sm90(SCRIPT, tmp_path, "flatten" if flatten else "no")
    kernels = [k for k in stdout.split("@@")[1:] if k.strip()]
    assert len(kernels) == 2  # GEMM1 and GEMM2
    for ttgir in kernels:
        fused = [b for b in _loops(ttgir)
                 if "warp_group_dot " in b and re.search(r"tt\.store|atomic", b)
                 and "scf.for" not in b]  # fmt: skip
        assert bool(fused) is flatten
