"""verify_tables: schema verdicts, the problem each entry runs on, and numerics through the op.

Without a GPU these run the interpreter's tiny stand-in problem (the module doc of
moetune.verify); with one, the tables' real shapes at a few batch sizes.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import HAS_GPU

import moetune.ops
from moetune.check import tolerance
from moetune.verify import (
    INTERPRETER_NOTE,
    EntryResult,
    collect_table_paths,
    verify_tables,
)

VLLM_TABLES = Path(
    os.environ.get("MOETUNE_VLLM_TABLES", Path(__file__).parents[2] / "shared/data/vllm-tables")
)
needs_vllm_tables = pytest.mark.skipif(
    not VLLM_TABLES.is_dir(), reason=f"vLLM's tables not found at {VLLM_TABLES}"
)

H100 = "NVIDIA_H100_80GB_HBM3"
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
         "num_warps": 4, "num_stages": 2}  # fmt: skip
WIDE = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
        "num_warps": 4, "num_stages": 3}  # fmt: skip
# On a GPU the tables run at their real shape: keep the batch sizes few there.
GPU_BATCHES = [1, 64] if HAS_GPU else None


def write_table(folder: Path, name: str, entries: dict, triton_version="3.6.0") -> Path:
    doc = {"triton_version": triton_version, **{str(k): v for k, v in entries.items()}}
    path = folder / name
    path.write_text(json.dumps(doc, indent=4))
    return path


def only(report, **match) -> list[EntryResult]:
    return [r for r in report.results if all(getattr(r, k) == v for k, v in match.items())]


def test_small_table_verifies_ok(tmp_path):
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL, 8: WIDE})
    report = verify_tables([path], K=64, topk=2)
    assert report.ok, report
    assert [(r.batch_size, r.status) for r in report.results] == [(1, "ok"), (8, "ok")]
    tol = tolerance(torch.bfloat16 if HAS_GPU else torch.float16)
    for r in report.results:
        assert r.file == str(path)
        assert r.rel_err is not None and r.rel_err <= tol and r.worst_row_err <= tol
        assert "K=64 topk=2" in r.problem
        assert r.config == (SMALL if r.batch_size == 1 else WIDE)
    if report.interpreter:
        assert report.note.startswith(INTERPRETER_NOTE)
        assert report.device == "cpu (Triton interpreter)"
        assert "stand-in" in report.results[0].problem and "float16" in report.results[0].problem
        assert "M=1" in report.results[0].problem
    json.dumps(report.as_dict(), allow_nan=False)


def test_mutated_entry_is_invalid_naming_file_and_key(tmp_path):
    path = write_table(
        tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL, 8: {**SMALL, "BLOCK_SIZE_M": 24}}
    )
    report = verify_tables([path])
    assert not report.ok
    [r] = report.results  # load_table rejects the file as a whole
    assert (r.status, r.batch_size, r.file) == ("invalid", 8, str(path))
    assert 'key "8"' in r.reason and "BLOCK_SIZE_M" in r.reason and "24" in r.reason


def test_malformed_json_is_invalid_not_a_traceback(tmp_path):
    path = tmp_path / f"E=4,N=32,device_name={H100}.json"
    path.write_text('{"triton_version": "3.6.0", "1": {"BLOCK_SIZE_M": 16,')
    report = verify_tables([path])
    [r] = report.results
    assert (r.status, r.batch_size, r.config) == ("invalid", None, None)
    assert "JSON" in r.reason
    assert not report.ok


def test_unknown_dtype_is_skipped_with_reason(tmp_path):
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100},dtype=int4_w4a16.json", {1: SMALL})
    report = verify_tables([path])
    [r] = report.results
    assert r.status == "skipped" and "int4_w4a16" in r.reason
    assert report.ok  # a skip is not a failure


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (f"E=4,N=32,device_name={H100},block_shape=[128,128].json", "without a w8a8 dtype"),
        (f"E=4,N=32,device_name={H100},dtype=fp8_w8a8,backend=flydsl.json", "backend=flydsl"),
        ("my-table.json", "not a table file name"),
    ],
    ids=["block-shape-without-dtype", "other-backend", "unparseable-name"],
)
def test_files_whose_problem_is_unknown_are_skipped(tmp_path, name, why):
    entry = {"tile_m": 16, "tile_n": 16, "tile_k": 16, "tile_n2": 16, "tile_k2": 16}
    path = write_table(tmp_path, name, {1: entry if "flydsl" in name else SMALL})
    [r] = verify_tables([path]).results
    assert r.status == "skipped" and why in r.reason, r


def test_fp8_block_table_clamps_block_k_like_vllm(tmp_path):
    """vLLM launches with BLOCK_SIZE_K = min(BLOCK_SIZE_K, *block_shape): 256 runs as 128."""
    entry = {**SMALL, "BLOCK_SIZE_K": 256}
    name = f"E=4,N=256,device_name={H100},dtype=fp8_w8a8,block_shape=[128,128].json"
    path = write_table(tmp_path, name, {2: entry, 16: {**WIDE, "BLOCK_SIZE_K": 128}})
    report = verify_tables([path], K=256, topk=2)
    assert report.ok, report
    clamped, unclamped = report.results
    assert clamped.status == "ok" and "256->128" in clamped.reason and "vLLM" in clamped.reason
    assert unclamped.status == "ok" and "vLLM" not in unclamped.reason
    assert clamped.config["BLOCK_SIZE_K"] == (32 if report.interpreter else 128)
    assert "fp8_w8a8 block=" in clamped.problem
    assert clamped.worst_row_err <= tolerance(torch.float16, "fp8_w8a8")


def test_entry_keys_the_kernel_does_not_take(tmp_path):
    rocm = {**SMALL, "waves_per_eu": 0, "matrix_instr_nonkdim": 16, "kpack": 2}
    entries = {1: {**SMALL, "SPLIT_K": 1}, 2: {**SMALL, "BLOCK_SIZE_M": 8}, 4: rocm, 8: SMALL}
    path = write_table(tmp_path, "E=4,N=32,device_name=AMD_Instinct_MI300X.json", entries)
    report = verify_tables([path], K=64)
    by_bs = {r.batch_size: r for r in report.results}
    assert by_bs[1].status == "skipped" and "SPLIT_K" in by_bs[1].reason
    assert by_bs[2].status == "skipped" and "BLOCK_SIZE_M" in by_bs[2].reason
    assert by_bs[4].status == by_bs[8].status == "ok"
    if not torch.version.hip:  # the launcher passes ROCm keys only on ROCm: dropped, and said
        assert "waves_per_eu" not in by_bs[4].config
        assert "ROCm-only keys (kpack, matrix_instr_nonkdim, waves_per_eu)" in report.note
    assert report.ok


def test_fault_in_the_op_fails_the_entry_and_the_report(tmp_path, monkeypatch):
    real = moetune.ops.fused_experts
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("launch exploded\nsecond line of the message")
        out = real(*args, **kwargs)
        out[0] += 1.0  # one token's output off by one: an epilogue-sized error
        return out

    monkeypatch.setattr(moetune.ops, "fused_experts", broken)
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL, 4: SMALL, 8: WIDE})
    report = verify_tables([path], K=64)
    assert not report.ok
    first, second, third = report.results  # the exception did not stop the run
    assert first.status == "failed" and first.reason == "RuntimeError: launch exploded"
    assert first.rel_err is None
    for r in (second, third):
        assert r.status == "failed" and "row 0 relative error" in r.reason, r
        assert r.worst_row_err > 10 * tolerance(torch.float16)
    json.dumps(report.as_dict(), allow_nan=False)


def test_poisoned_rows_fail(tmp_path, monkeypatch):
    real = moetune.ops.fused_experts

    def unwritten_row(*args, **kwargs):
        out = real(*args, **kwargs)
        out[-1] = float("nan")  # what a row the kernel never wrote looks like
        return out

    monkeypatch.setattr(moetune.ops, "fused_experts", unwritten_row)
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {4: SMALL})
    [r] = verify_tables([path], K=64).results
    assert r.status == "failed" and "NaN" in r.reason
    assert math.isnan(r.rel_err) or math.isinf(r.rel_err)
    assert json.dumps(r.as_dict(), allow_nan=False)


def test_k_and_topk_from_options_presets_or_defaults(tmp_path):
    paths = [
        write_table(tmp_path, f"E=8,N=7168,device_name={H100}.json", {1: SMALL}),  # Mixtral tp=2
        write_table(tmp_path, f"E=32,N=2880,device_name={H100}.json", {1: SMALL}),  # gpt-oss-20b
        write_table(tmp_path, f"E=3,N=100,device_name={H100}.json", {1: SMALL}),  # no preset
    ]
    mixtral, gpt_oss, none = (r.problem for r in verify_tables(paths, schema_only=True).results)
    assert "E=8 N=7168 K=4096 topk=2" in mixtral and "Mixtral-8x7B at tp=2" in mixtral
    assert "K=2880 topk=4" in gpt_oss and "bias swigluoai" in gpt_oss
    assert "K=4096 topk=2" in none and "defaults" in none
    [opt] = verify_tables(paths[2:], K=1024, topk=3, schema_only=True).results
    assert "E=3 N=100 K=1024 topk=3" in opt.problem and "defaults" not in opt.problem
    [capped] = verify_tables(paths[2:], topk=8, schema_only=True).results
    assert "topk=3" in capped.problem and "capped" in capped.problem


def test_batch_sizes_progress_and_schema_only(tmp_path):
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL, 4: SMALL, 8: WIDE})
    lines: list[str] = []
    report = verify_tables([path], batch_sizes=[4, 8], progress=lines.append, schema_only=True)
    assert [r.batch_size for r in report.results] == [4, 8]
    assert all(r.status == "ok" and r.reason.startswith("not run") for r in report.results)
    assert all(r.rel_err is None for r in report.results) and report.schema_only
    assert "Only batch sizes [4, 8]" in report.note and "Schema only" in report.note
    assert len(lines) == 2 and lines[0].startswith(path.name + " M=4: ok")


def test_collect_table_paths(tmp_path):
    a = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL})
    (tmp_path / f"E=4,N=32,device_name={H100}.provenance.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a table")
    (tmp_path / "sub").mkdir()
    write_table(tmp_path / "sub", f"E=8,N=32,device_name={H100}.json", {1: SMALL})
    assert collect_table_paths([tmp_path]) == [a]  # no sidecar, no subfolder
    assert collect_table_paths([a, tmp_path]) == [a]  # duplicates once
    with pytest.raises(ValueError, match=r"nope\.json"):
        collect_table_paths([tmp_path / "nope.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        collect_table_paths([tmp_path / "empty"])
    with pytest.raises(ValueError, match="missing"):
        verify_tables([tmp_path / "missing"])


@pytest.mark.skipif(HAS_GPU, reason="the interpreter's own rules")
def test_interpreter_refuses_a_gpu_device(tmp_path):
    path = write_table(tmp_path, f"E=4,N=32,device_name={H100}.json", {1: SMALL})
    with pytest.raises(ValueError, match="interpreter"):
        verify_tables([path], device="cuda")


REAL_FILES = [
    "E=8,N=14336,device_name=AMD_Instinct_MI300X.json",  # ROCm keys, Mixtral preset
    "E=512,N=160,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[32,32].json",
    "E=16,N=3072,device_name=NVIDIA_H200,dtype=int8_w8a16.json",
    "E=64,N=512,device_name=Intel(R)_Arc(TM)_Pro_B70_Graphics.json",  # grf_mode: skipped
]


@needs_vllm_tables
def test_real_vllm_tables_verify(tmp_path):
    paths = [VLLM_TABLES / f for f in REAL_FILES]
    report = verify_tables(paths, batch_sizes=GPU_BATCHES)
    assert report.ok, [r for r in report.results if r.status not in ("ok", "skipped")]
    assert {Path(r.file).name for r in report.results} == set(REAL_FILES)
    for r in report.results:
        assert r.status in ("ok", "skipped"), r
        if r.status == "skipped":
            assert r.reason, r
        else:
            assert r.worst_row_err is not None and math.isfinite(r.worst_row_err)
    intel = [r for r in report.results if "Intel" in r.file]
    assert intel and all(r.status == "skipped" and "grf_mode" in r.reason for r in intel)
    assert len(only(report, status="ok")) >= (6 if HAS_GPU else 40)


@needs_vllm_tables
def test_schema_only_over_every_vllm_table():
    report = verify_tables([VLLM_TABLES], schema_only=True)
    files = {Path(r.file).name for r in report.results}
    assert len(files) == len(list(VLLM_TABLES.glob("*.json"))) == 338
    assert report.counts["invalid"] == 0 and report.ok
    assert report.counts["ok"] > 5000
    for r in only(report, status="skipped"):
        assert r.reason, r
    int4 = [r for r in report.results if "int4_w4a16" in r.file]
    assert int4 and all(r.status == "skipped" for r in int4)


@pytest.mark.gpu
@needs_vllm_tables
def test_h100_table_at_its_real_shape():
    path = VLLM_TABLES / "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    report = verify_tables([path], batch_sizes=[1, 256, 4096])
    assert report.ok, report.results
    assert not report.interpreter and "stand-in" not in report.results[0].problem
    assert all("E=8 N=14336 K=4096 topk=2 bfloat16 fp8_w8a8" in r.problem for r in report.results)
    assert "fp8 entries ran with MOETUNE_FP8_ACCUM=" in report.note  # the mode the GPU ran


def test_note_names_the_fp8_mode_only_when_fp8_entries_ran_on_a_gpu(monkeypatch):
    """A verify under tile and one under auto read alike otherwise; the interpreter and
    schema-only runs have no accumulation mode to name."""
    from moetune.verify import _note
    from moetune.verify_plan import Notes, Target

    monkeypatch.setenv("MOETUNE_FP8_ACCUM", "tile")
    gpu = Target(True, False, False, "cuda:0", H100, torch.float8_e4m3fn)
    assert "fp8 entries ran with MOETUNE_FP8_ACCUM=tile." in _note(gpu, Notes(fp8_ran=True), None)
    assert "MOETUNE_FP8_ACCUM" not in _note(gpu, Notes(), None)


def test_interpreter_verify_of_an_fp8_table_names_no_mode(tmp_path):
    path = write_table(tmp_path, "E=4,N=32,device_name=cpu_interpreter,dtype=fp8_w8a8.json",
                       {1: SMALL})  # fmt: skip
    report = verify_tables([path], K=64, topk=2)
    assert report.ok, report.results
    assert "MOETUNE_FP8_ACCUM" not in report.note


@pytest.mark.parametrize("dtype, named", [(",dtype=fp8_w8a8", True), (",dtype=float32", False)])
def test_a_gpu_verify_names_the_mode_of_the_fp8_entries_it_ran(tmp_path, monkeypatch, dtype,
                                                               named):  # fmt: skip
    """The entries run in the interpreter here, but verify is told it has a GPU: the note names
    the mode exactly when an fp8 entry ran."""
    from moetune import verify
    from moetune.verify_plan import Target

    gpu = Target(True, False, False, "cpu", "cpu", torch.float8_e4m3fn)
    monkeypatch.setattr(verify, "plan_target", lambda device, schema_only: gpu)
    monkeypatch.setenv("MOETUNE_FP8_ACCUM", "fast")
    path = write_table(tmp_path, f"E=4,N=32,device_name=cpu{dtype}.json", {1: SMALL})
    report = verify_tables([path], K=64, topk=2)
    assert report.ok, report.results
    assert ("fp8 entries ran with MOETUNE_FP8_ACCUM=fast." in report.note) is named
