"""Tuning with static w8a8 activation scales (--act-scales): the default for per-tensor w8a8, as
vLLM's tuner and checkpoints with input scales run. The op then takes another kernel path
(ops.fuse_gemm1), so a sweep must time and check that path, and compile processes build it."""

import pytest
import torch
from conftest import HAS_GPU
from helpers import record_launches
from typer.testing import CliRunner

from moetune import ops
from moetune.cli import app
from moetune.evaluate import Workload
from moetune.journal import JournalError, read_journal
from moetune.platform import get_platform
from moetune.precompile import compile_inputs
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import Execution, run_sweep

runner = CliRunner()
FP8 = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
PLATFORM = get_platform("interpreter")


def _has_scales(kw: dict) -> bool:
    a1, a2 = kw.get("a1_scale"), kw.get("a2_scale")
    return a1 is not None and a2 is not None and a1.shape == a2.shape == (1,)


def test_workload_calibrates_every_set_and_every_fresh_draw():
    static = Workload(FP8, PLATFORM, [1, 8], "cpu", act_scales="static")
    assert static.sets and all(_has_scales(kw) for _, kw in static.sets)
    assert all(torch.isfinite(kw["a2_scale"]).all() and kw["a2_scale"] > 0 for _, kw in static.sets)
    assert _has_scales(static._draw(8, seed=99)[1])
    dynamic = Workload(FP8, PLATFORM, [1, 8], "cpu")
    assert not any(kw.get("a1_scale") is not None for _, kw in dynamic.sets)
    assert dynamic._draw(8, seed=99)[1].get("a1_scale") is None


def test_run_sweep_refuses_static_scales_where_they_do_not_apply(tmp_path):
    bf16 = Problem(4, 32, 64, 2, "float16")
    for problem, act_scales in ((bf16, "static"), (FP8, "Static")):
        with pytest.raises(ValueError, match=r"act_scales|static activation scales"):
            run_sweep(problem, PLATFORM, [], batch_sizes=[1], journal_path=tmp_path / "j.jsonl",
                      space_name="tiny", execution=Execution(act_scales=act_scales))  # fmt: skip
    assert not (tmp_path / "j.jsonl").exists()


@pytest.mark.parametrize(("limit", "sizes"), [(20, [16, 21]), (8, [8, 9]), (None, [16])])
def test_compile_inputs_cover_both_sides_of_the_static_fp8_limit(monkeypatch, limit, sizes):
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", None)  # no one-token set (test_pdl.py)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", limit)
    sets = compile_inputs(FP8, "cpu", torch.float8_e4m3fn, "static")
    assert [a[0].shape[0] for a, _ in sets] == sizes
    assert all(_has_scales(kw) for _, kw in sets)
    (only,) = compile_inputs(FP8, "cpu", torch.float8_e4m3fn, "dynamic")
    assert only[0][0].shape[0] == 16 and only[1].get("a1_scale") is None


@pytest.mark.skipif(HAS_GPU, reason="sweeps the interpreter platform")
def test_a_static_sweep_times_the_static_path_and_no_dynamic_sweep_resumes_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", 4)  # M=2 fused, M=8 not
    launches = record_launches(monkeypatch, run=True)  # in this process: no worker processes
    cands = search_space(PLATFORM, FP8, "tiny")[:1]
    journal = tmp_path / "j.jsonl"

    def sweep(act_scales: str):
        return run_sweep(FP8, PLATFORM, cands, batch_sizes=[2, 8], journal_path=journal,
                         space_name="tiny", execution=Execution(act_scales=act_scales))  # fmt: skip

    result = sweep("static")
    assert all(b.best is not None for b in result.batches)
    assert read_journal(journal).header["act_scales"] == "static"
    # GEMM1 with the re-quantization in its epilogue ran (M=2) and GEMM1 without the fused
    # epilogue ran (M=8); a dynamic-scale sweep runs neither.
    assert any(k["QUANT_OUT"] for k in launches)
    assert any(k["ACTIVATION"] == 0 and not k["QUANT_OUT"] for k in launches[::2])
    before = journal.read_bytes()
    with pytest.raises(JournalError, match="act_scales"):
        sweep("dynamic")
    assert journal.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--act-scales", "static"], "per-tensor fp8_w8a8 and int8_w8a8"),
        (["--quant", "fp8_w8a8", "--act-scales", "sometimes"], "static or dynamic"),
        (["--quant", "fp8_w8a8", "--per-channel", "--act-scales", "static"], "per-tensor"),
    ],
)
def test_act_scales_mistakes_give_one_error_line(extra, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "2", "--space", "tiny", "--journal", "j.jsonl", "--out", "t",
            *extra]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "j.jsonl").exists()


@pytest.mark.skipif(HAS_GPU, reason="sweeps the interpreter platform")
def test_worker_processes_get_the_static_scales(tmp_path):
    """The scales reach the inputs of a worker process too: every pair it ran says so."""
    cands = search_space(PLATFORM, FP8, "tiny")[:1]
    journal = tmp_path / "j.jsonl"
    result = run_sweep(FP8, PLATFORM, cands, batch_sizes=[2], journal_path=journal,
                       space_name="tiny",
                       execution=Execution(isolate=True, act_scales="static"))  # fmt: skip
    assert result.batches[0].best is not None
    j = read_journal(journal)
    assert j.header["act_scales"] == "static"
    pairs = [r for r in j.records if "status" in r]
    assert pairs and {r["status"] for r in pairs} == {"ok"}
    assert all(r.get("act_scales") == "static" for r in pairs)
