"""The search space: knob sets per platform, pruning before compile, restrict, spec files.

Platforms are simulated descriptions (moetune.platform); nothing here needs a GPU.
"""

import functools
import json
import re
from pathlib import Path

import pytest

from moetune.platform import get_platform
from moetune.presets import preset_problem
from moetune.problem import Problem
from moetune.space import (
    CUDA_KNOBS,
    KNOBS,
    TINY_SIZE,
    Candidate,
    load_space_spec,
    max_block_m,
    prune_reason,
    search_space,
    shared_mem_bytes,
    space_id,
)

MIXTRAL = preset_problem("Mixtral-8x7B")  # bf16, E=8 N=14336 K=4096
DSV3 = preset_problem("DeepSeek-V3", 8)  # fp8 block [128, 128], E=256 N=256 K=7168
QWEN = preset_problem("Qwen3-30B-A3B")  # bf16, E=128 topk=8
TABLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vllm-tables"


@functools.cache
def space(key: str, problem: Problem, name: str = "full") -> tuple[Candidate, ...]:
    return tuple(search_space(get_platform(key), problem, name))


# Sizes after the batch-independent pruning; a change here changes every sweep's cost, so it
# should be deliberate (and the final report's numbers updated).
@pytest.mark.parametrize(
    ("key", "problem", "full", "fast"),
    [
        ("h100", MIXTRAL, 1304, 298),
        ("h100", DSV3, 1248, 278),
        ("mi325x", MIXTRAL, 25760, 216),
        ("mi325x", DSV3, 19680, 156),
        ("mi355x", MIXTRAL, 14160, 114),
        ("mi355x", DSV3, 9840, 78),
    ],
)
def test_space_sizes(key, problem, full, fast):
    assert len(space(key, problem, "full")) == full
    assert len(space(key, problem, "fast")) == fast
    assert set(space(key, problem, "fast")) <= set(space(key, problem, "full"))


def test_cuda_candidates_use_only_cuda_knobs():
    full = {
        "BLOCK_SIZE_M": {16, 32, 64, 128, 256},
        "BLOCK_SIZE_N": {32, 64, 128, 256},
        "BLOCK_SIZE_K": {64, 128, 256},
        "GROUP_SIZE_M": {1, 16, 32, 64},
        "num_warps": {4, 8},
        "num_stages": {2, 3, 4, 5},
    }
    cands = space("h100", MIXTRAL)
    for knob, allowed in full.items():
        assert {getattr(c, knob) for c in cands} == allowed, knob
    assert all(c.waves_per_eu is c.matrix_instr_nonkdim is c.kpack is None for c in cands)
    assert all(set(c.as_config()) == set(CUDA_KNOBS) for c in cands)


@pytest.mark.parametrize(("key", "kpacks"), [("mi325x", {1, 2}), ("mi355x", {1})])
def test_rocm_knob_sets(key, kpacks):
    """gfx942 tunes kpack in {1, 2}; gfx950 deprecates kpack, so only 1 (Triton forces it)."""
    for name in ("full", "fast"):
        cands = space(key, MIXTRAL, name)
        assert {c.kpack for c in cands} == kpacks
        assert {c.num_stages for c in cands} == {2}
        assert {c.num_warps for c in cands} <= {1, 2, 4, 8}
        assert {c.waves_per_eu for c in cands} <= {0, 1, 2, 4}
        assert {c.matrix_instr_nonkdim for c in cands} <= {16, 32}
        assert all(set(c.as_config()) == set(KNOBS) for c in cands)
    full = space(key, MIXTRAL)
    assert {c.waves_per_eu for c in full} == {0, 1, 2, 4}
    assert {c.BLOCK_SIZE_N for c in full} == {16, 32, 64, 128, 256}


@pytest.mark.parametrize("key", ["h100", "a100", "mi325x", "mi355x"])
@pytest.mark.parametrize(
    "problem",
    [MIXTRAL, DSV3, Problem(E=8, N=512, K=1024, topk=2, dtype="float32")],
    ids=["bf16", "fp8-block", "fp32"],
)
def test_no_kept_candidate_exceeds_shared_memory(key, problem):
    platform = get_platform(key)
    cands = space(key, problem)
    assert cands
    assert max(shared_mem_bytes(c, platform, problem) for c in cands) <= platform.shared_mem_bytes


def test_over_limit_candidate_is_pruned_with_reason():
    """128x256x64 bf16 tiles take 48 KiB a stage; wgmma on Hopper keeps all 5 stages."""
    c = Candidate(128, 256, 64, 1, 8, 5)
    assert prune_reason(c, get_platform("h100"), MIXTRAL) == "shared memory 245760 B > 232448 B"
    assert prune_reason(Candidate(128, 256, 64, 1, 8, 4), get_platform("h100"), MIXTRAL) is None
    assert c not in space("h100", MIXTRAL)


def test_fp32_needs_twice_the_shared_memory():
    fp32 = Problem(E=8, N=512, K=1024, topk=2, dtype="float32")
    c = Candidate(128, 256, 64, 1, 8, 4)  # bf16: 196608 B fits; fp32: 393216 B does not
    assert prune_reason(c, get_platform("h100"), MIXTRAL) is None
    assert prune_reason(c, get_platform("h100"), fp32) == "shared memory 393216 B > 232448 B"


def test_pipeline_depth_per_architecture():
    """Ampere keeps num_stages-1 buffers, gfx942 one LDS buffer at num_stages 2, gfx950 two."""
    a100 = get_platform("a100")
    assert prune_reason(Candidate(128, 256, 64, 1, 8, 4), a100, MIXTRAL) is None  # 3 x 48 KiB
    assert "shared memory" in prune_reason(Candidate(128, 256, 64, 1, 8, 5), a100, MIXTRAL)
    rocm = Candidate(128, 128, 128, 1, 8, 2, 0, 16, 1)  # 64 KiB a stage in bf16
    assert prune_reason(rocm, get_platform("mi325x"), MIXTRAL) is None
    bigger = Candidate(128, 256, 128, 1, 8, 2, 0, 16, 1)  # 96 KiB a stage
    assert (
        prune_reason(bigger, get_platform("mi325x"), MIXTRAL) == "shared memory 98304 B > 65536 B"
    )
    assert prune_reason(bigger, get_platform("mi355x"), MIXTRAL) == (
        "shared memory 196608 B > 163840 B"
    )


def test_block_quant_excludes_k_tiles_wider_than_block_k():
    assert {c.BLOCK_SIZE_K for c in space("h100", DSV3)} == {64, 128}
    assert 256 in {c.BLOCK_SIZE_K for c in space("h100", preset_problem("DeepSeek-V3", quant=None))}
    c = Candidate(64, 128, 256, 1, 4, 3)
    reason = prune_reason(c, get_platform("h100"), DSV3)
    assert reason == "BLOCK_SIZE_K 256 does not divide block_k 128"
    # BLOCK_SIZE_N below block_n is kept: weight scales are indexed per output column.
    assert any(c.BLOCK_SIZE_N < 128 for c in space("h100", DSV3))


def test_8bit_operands_need_k_tiles_of_32():
    fp8 = preset_problem("Mixtral-8x7B", quant="fp8_w8a8")
    assert 16 in {c.BLOCK_SIZE_K for c in space("mi325x", MIXTRAL)}
    assert 16 not in {c.BLOCK_SIZE_K for c in space("mi325x", fp8)}
    assert len(space("h100", fp8, "tiny")) == 4 < len(space("h100", MIXTRAL, "tiny")) == 6


def test_small_batch_prunes_large_block_m():
    """M=1 on E=128, top-8: 1/16 token per expert, so any BLOCK_SIZE_M >= 64 is padding."""
    h100 = get_platform("h100")
    kept = [c for c in space("h100", QWEN) if prune_reason(c, h100, QWEN, M=1) is None]
    assert {c.BLOCK_SIZE_M for c in kept} == {16}
    big = Candidate(64, 128, 128, 1, 4, 3)
    assert re.match(
        r"BLOCK_SIZE_M 64 > 16 for ~0.0625 tokens per expert", prune_reason(big, h100, QWEN, M=1)
    )
    assert prune_reason(big, h100, QWEN, M=4096) is None
    # 8-bit GEMMs on Hopper win with 64-row wgmma tiles even at M=1 (vLLM's H100/H200 tables).
    fp8 = preset_problem("Qwen3-30B-A3B", quant="fp8_w8a8")
    assert prune_reason(big, h100, fp8, M=1) is None
    assert prune_reason(Candidate(128, 128, 128, 1, 4, 3), h100, fp8, M=1) is not None
    with pytest.raises(ValueError):
        prune_reason(big, h100, QWEN, M=0)


def test_tiles_wider_than_both_gemms_are_waste():
    small = Problem(E=4, N=32, K=64, topk=2)  # GEMM1 2N=64 wide, GEMM2 K=64 wide
    h100 = get_platform("h100")
    assert {c.BLOCK_SIZE_N for c in search_space(h100, small)} == {32, 64}
    assert {c.BLOCK_SIZE_K for c in search_space(h100, small)} == {64}
    assert prune_reason(Candidate(16, 128, 64, 1, 4, 2), h100, small).startswith("BLOCK_SIZE_N 128")


def test_rocm_knobs_on_cuda_are_pruned():
    c = Candidate(64, 128, 64, 1, 4, 2, 0, 16, 1)
    assert "only exist on ROCm" in prune_reason(c, get_platform("h100"), MIXTRAL)
    assert prune_reason(c, get_platform("mi325x"), MIXTRAL) is None
    nk32 = Candidate(16, 128, 64, 1, 4, 2, 0, 32, 1)
    assert "matrix_instr_nonkdim 32" in prune_reason(nk32, get_platform("mi325x"), MIXTRAL)


def test_too_many_warps_for_a_tile():
    c = Candidate(16, 16, 64, 1, 16, 2)  # 256 outputs over 16 warps
    assert "outputs per warp" in prune_reason(c, get_platform("h100"), MIXTRAL)
    assert prune_reason(Candidate(16, 16, 64, 1, 8, 2), get_platform("h100"), MIXTRAL) is None


def test_restrict_narrows_and_accepts_valid_outside_values():
    h100 = get_platform("h100")
    r = search_space(h100, MIXTRAL, restrict={"BLOCK_SIZE_M": [16, 32], "num_warps": [4]})
    expected = [c for c in space("h100", MIXTRAL) if c.BLOCK_SIZE_M <= 32 and c.num_warps == 4]
    assert r == expected and r
    outside = search_space(h100, MIXTRAL, "fast", restrict={"GROUP_SIZE_M": [8]})
    assert outside and {c.GROUP_SIZE_M for c in outside} == {8}


@pytest.mark.parametrize(
    ("key", "restrict", "match"),
    [
        ("h100", {"BLOCK_M": [16]}, "unknown knob"),
        ("h100", {"waves_per_eu": [0]}, "only exist on ROCm"),
        ("h100", {"BLOCK_SIZE_M": [24]}, "power of two"),
        ("h100", {"num_warps": [3]}, "power of two"),
        ("h100", {"num_warps": [64]}, "1024 threads"),
        ("h100", {"num_stages": [-1]}, "negative"),
        ("h100", {"num_stages": ["3"]}, "not an integer"),
        ("h100", {"num_stages": []}, "non-empty"),
        ("mi355x", {"kpack": [2]}, "deprecated on gfx950"),
        ("mi325x", {"matrix_instr_nonkdim": [8]}, "16 or 32"),
    ],
)
def test_restrict_rejects_bad_input(key, restrict, match):
    with pytest.raises(ValueError, match=match):
        search_space(get_platform(key), MIXTRAL, restrict=restrict)


def test_unknown_space_name():
    with pytest.raises(ValueError, match="unknown space"):
        search_space(get_platform("h100"), MIXTRAL, "huge")


def test_interpreter_reduces_to_tiny_unless_restricted():
    interp = get_platform("interpreter")
    for name in ("full", "fast", "tiny"):
        cands = search_space(interp, MIXTRAL, name)
        assert 0 < len(cands) <= TINY_SIZE <= 8
        assert all(max(c.BLOCK_SIZE_M, c.BLOCK_SIZE_N, c.BLOCK_SIZE_K) <= 32 for c in cands)
    widened = search_space(interp, MIXTRAL, restrict={"BLOCK_SIZE_M": [64]})
    assert {c.BLOCK_SIZE_M for c in widened} == {64}


def test_space_is_deterministic_and_id_tracks_content():
    h100 = get_platform("h100")
    a, b = search_space(h100, MIXTRAL, "fast"), search_space(h100, MIXTRAL, "fast")
    assert a == b == sorted(set(a))
    assert space_id(a) == space_id(b) == space_id(list(reversed(a)))
    assert re.fullmatch(r"[0-9a-f]{12}", space_id(a))
    others = [
        search_space(h100, MIXTRAL, "full"),
        search_space(h100, MIXTRAL, "fast", restrict={"num_stages": [3]}),
        search_space(h100, DSV3, "fast"),
        a[:-1],
    ]
    assert len({space_id(a), *(space_id(o) for o in others)}) == 1 + len(others)
    # Same size, different content.
    g2, g4 = (search_space(h100, MIXTRAL, "fast", {"GROUP_SIZE_M": [g]}) for g in (2, 4))
    assert len(g2) == len(g4) and space_id(g2) != space_id(g4)


@pytest.mark.parametrize("key", ["h100", "mi325x", "mi355x", "interpreter"])
def test_candidate_config_round_trip(key):
    for c in space(key, MIXTRAL, "fast"):
        cfg = c.as_config()
        assert Candidate.from_config(cfg) == c
        assert Candidate.from_config(json.loads(json.dumps(cfg))) == c


def test_candidate_key_and_from_config_errors():
    assert Candidate(64, 128, 64, 8, 4, 3).key() == "M64-N128-K64-G8-w4-s3"
    assert Candidate(64, 128, 64, 8, 4, 2, 2, 16, 1).key() == "M64-N128-K64-G8-w4-s2-wpe2-nk16-kp1"
    good = Candidate(64, 128, 64, 8, 4, 3).as_config()
    for bad, match in [
        ({**good, "SPLIT_K": 1}, "unknown keys"),
        ({k: v for k, v in good.items() if k != "num_stages"}, "missing num_stages"),
        ({**good, "num_warps": 4.0}, "integer"),
        ({**good, "num_warps": True}, "integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            Candidate.from_config(bad)


# --- spec files ---------------------------------------------------------------------------------


def test_load_space_spec(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text("space: fast\nrestrict:\n  BLOCK_SIZE_M: [16, 32]\n  num_warps: 4\n")
    spec = load_space_spec(p)
    assert spec == {"space": "fast", "restrict": {"BLOCK_SIZE_M": [16, 32], "num_warps": [4]}}
    cands = search_space(get_platform("h100"), MIXTRAL, spec["space"], spec["restrict"])
    assert cands and all(c.BLOCK_SIZE_M <= 32 and c.num_warps == 4 for c in cands)
    (tmp_path / "empty.yaml").write_text("")
    assert load_space_spec(tmp_path / "empty.yaml") == {"space": None, "restrict": None}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("space: fast\nrestict: {}\n", "unknown keys restict"),
        ("space: medium\n", "space must be one of"),
        ("restrict: {BLOCK_SIZE_Q: [16]}\n", "unknown knob"),
        ("restrict: {num_warps: [four]}\n", "not an integer"),
        ("restrict: {num_warps: [4.5]}\n", "not an integer"),
        ("restrict: {num_warps: [true]}\n", "not an integer"),
        ("restrict: {GROUP_SIZE_M: [-8]}\n", "negative"),
        ("restrict: [16, 32]\n", "mapping"),
        ("- fast\n", "mapping"),
        ("space: [unclosed\n", "not valid YAML"),
    ],
)
def test_load_space_spec_errors_name_the_file(tmp_path, text, match):
    p = tmp_path / "bad-spec.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_space_spec(p)
    assert "bad-spec.yaml" in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_space_spec(tmp_path / "missing.yaml")


# --- against the tables vLLM ships --------------------------------------------------------------

_TABLE = re.compile(
    r"E=(\d+),N=(\d+),device_name=([^,]+)(?:,dtype=([a-z0-9_]+))?(?:,block_shape=\[(\d+),(\d+)\])?"
    r"\.json"
)
_PLATFORM_OF = {"H100": "h100", "H200": "h200", "A100": "a100", "MI300X": "mi300x"}
_PLATFORM_OF |= {"MI325": "mi325x", "MI350": "mi355x", "MI355": "mi355x"}
# Top-k of the models behind the shipped tables' expert counts (Mixtral, Qwen3/DeepSeek, ...).
_TOPK = {8: 2, 16: 2, 32: 4, 60: 4, 64: 8, 72: 4, 128: 8, 160: 6, 256: 8}


def _shipped_entries():
    if not TABLES.is_dir():
        pytest.skip(f"vLLM tables not found at {TABLES} (a user's clone has no shared/)")
    for path in sorted(TABLES.glob("*.json")):
        m = _TABLE.fullmatch(path.name)
        key = m and next((v for k, v in _PLATFORM_OF.items() if k in m[3]), None)
        # "dtype=bf16" is not a name vLLM reads (bf16 tables carry no dtype part).
        if not key or m[4] not in (None, "fp8_w8a8", "int8_w8a8", "int8_w8a16", "float8"):
            continue
        E, dtype = int(m[1]), m[4]
        # Old tables say "float8"; a block table without a dtype part is fp8 too.
        quant = "fp8_w8a8" if dtype == "float8" or (dtype is None and m[5]) else dtype
        block = (int(m[5]), int(m[6])) if m[5] else None
        topk = _TOPK.get(E, 1)
        problem = Problem(E=E, N=int(m[2]), K=4096, topk=topk, quant=quant, block_shape=block)
        for batch, cfg in json.loads(path.read_text()).items():
            if batch != "triton_version":
                yield get_platform(key), problem, int(batch), Candidate.from_config(cfg)


def test_shared_memory_model_admits_vllm_winners():
    """Every winner vLLM ships for these GPUs fit on the device, so the estimate must admit it.

    Block-quant entries with BLOCK_SIZE_K > block_k are skipped: vLLM clamps BLOCK_SIZE_K to the
    block size at launch, so they never ran as written.
    """
    total, over = 0, []
    for platform, problem, _, c in _shipped_entries():
        block_k = problem.block_shape[1] if problem.block_shape else c.BLOCK_SIZE_K
        if block_k < c.BLOCK_SIZE_K:
            continue
        total += 1
        if shared_mem_bytes(c, platform, problem) > platform.shared_mem_bytes:
            over.append((platform.key, problem.describe(), c.key()))
    assert total > 3000
    assert not over, over[:5]


def test_batch_pruning_keeps_vllm_winners():
    """The BLOCK_SIZE_M cap keeps at least 97% of shipped winners (uniform-routing estimate)."""
    entries = [(pl, pr, M, c) for pl, pr, M, c in _shipped_entries() if pr.E in _TOPK]
    cut = [c for pl, pr, M, c in entries if max_block_m(pl, pr, M) < c.BLOCK_SIZE_M]
    assert len(entries) > 3000
    assert len(cut) <= 0.03 * len(entries)
