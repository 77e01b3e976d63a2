"""The fp8 accumulation modes: what each hands the kernel as ``max_num_imprecise_acc``."""

import pytest
from conftest import HAS_GPU
from helpers import record_launches

from moetune.accum import FP8_ACCUM_ENV, fp8_accum_mode, fp8_max_imprecise_acc


@pytest.mark.parametrize(
    "mode, block_m, block_k, expected",
    [
        ("precise", 128, 128, 0),  # promote after every instruction
        ("tile", 16, 64, 64),  # once per K tile
        ("tile", 256, 128, 128),
        ("fast", 16, 128, None),  # never (vLLM's kernel)
        ("auto", 16, 128, 128),  # short tiles promote per K tile
        ("auto", 64, 64, 64),
        ("auto", 128, 128, None),  # tall tiles run fast
        ("auto", 256, 64, None),
    ],
)
def test_modes(monkeypatch, mode, block_m, block_k, expected):
    monkeypatch.setenv(FP8_ACCUM_ENV, mode)
    assert fp8_accum_mode() == mode
    assert fp8_max_imprecise_acc(block_m, block_k) == expected


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv(FP8_ACCUM_ENV, raising=False)
    assert fp8_accum_mode() == "auto"
    assert fp8_max_imprecise_acc(64, 128) == 128
    assert fp8_max_imprecise_acc(128, 128) is None


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(FP8_ACCUM_ENV, "Fast")
    with pytest.raises(ValueError, match="MOETUNE_FP8_ACCUM must be one of auto, precise"):
        fp8_max_imprecise_acc(64, 64)


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """The keyword arguments of every fused-MoE kernel launch, which is recorded, not run."""
    return record_launches(monkeypatch, run=False)


def test_empty_value_means_the_default(monkeypatch):
    monkeypatch.setenv(FP8_ACCUM_ENV, "")  # as `VAR= cmd` and env files set it
    assert fp8_accum_mode() == "auto"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the recorder leaves buffers unwritten
@pytest.mark.parametrize("block_m, expected", [(16, 32), (64, 32), (128, None)])
def test_the_kernel_gets_the_mode_of_its_own_tile(monkeypatch, launches, block_m, expected, device):
    """Both GEMMs' launches carry max_num_imprecise_acc for the config's BLOCK_SIZE_M and
    BLOCK_SIZE_K (the interpreter ignores the value, so the launch itself is recorded)."""
    from moetune.inputs import random_moe_inputs
    from moetune.ops import fused_experts
    from moetune.problem import Problem

    monkeypatch.delenv(FP8_ACCUM_ENV, raising=False)
    problem = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
    args, kw = random_moe_inputs(problem, 8, device, seed=0)
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32,
              "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}  # fmt: skip
    fused_experts(*args, config=config, **kw)
    assert len(launches) == 2  # up and down GEMM
    assert [s["FP8_MAX_IMPRECISE_ACC"] for s in launches] == [expected, expected]
    assert [s["BLOCK_SIZE_M"] for s in launches] == [block_m, block_m]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bf16_and_int8_never_take_the_fp8_mode(monkeypatch, launches, device):
    from moetune.inputs import random_moe_inputs
    from moetune.ops import fused_experts
    from moetune.problem import Problem

    monkeypatch.setenv(FP8_ACCUM_ENV, "fast")
    for quant in (None, "int8_w8a8"):
        problem = Problem(4, 32, 64, 2, "float16", quant=quant)
        args, kw = random_moe_inputs(problem, 8, device, seed=0)
        fused_experts(*args, config={"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32,
                                     "GROUP_SIZE_M": 1}, **kw)  # fmt: skip
    assert [s["FP8_MAX_IMPRECISE_ACC"] for s in launches] == [0, 0, 0, 0]


@pytest.mark.skipif(HAS_GPU, reason="sweeps the interpreter platform")
def test_an_fp8_journal_records_its_mode_and_no_other_mode_resumes_it(tmp_path, monkeypatch):
    from moetune.journal import JournalError, read_journal
    from moetune.platform import get_platform
    from moetune.problem import Problem
    from moetune.space import search_space
    from moetune.sweep import Execution, run_sweep

    problem = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
    platform = get_platform("interpreter")
    cands = search_space(platform, problem, "tiny")[:1]
    journal = tmp_path / "j.jsonl"

    def sweep():
        return run_sweep(problem, platform, cands, batch_sizes=[1], journal_path=journal,
                         space_name="tiny", execution=Execution())  # fmt: skip

    monkeypatch.delenv(FP8_ACCUM_ENV, raising=False)
    assert sweep().batches[0].best is not None
    assert read_journal(journal).header["fp8_accum"] == "auto"
    before = journal.read_bytes()
    monkeypatch.setenv(FP8_ACCUM_ENV, "tile")
    with pytest.raises(JournalError, match="fp8_accum"):
        sweep()
    assert journal.read_bytes() == before
