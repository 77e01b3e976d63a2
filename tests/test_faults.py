"""Fault injection: every kind of bad candidate is recorded with its reason, the sweep finishes,
and the exported table holds none of them. Faults enter through moetune.faults (a test-only hook),
never through the kernel."""

import json
from pathlib import Path

import pytest

from moetune.export import best_entries
from moetune.journal import read_journal
from moetune.platform import get_platform
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import Execution, run_sweep

PROBLEM = Problem(4, 32, 64, 2, "float16")
PLATFORM = get_platform("interpreter")
M = 16  # every tiny-space tile is kept at this batch size (none pruned)


def _sweep(tmp_path: Path, faults: dict, monkeypatch, execution: Execution) -> dict:
    cands = search_space(PLATFORM, PROBLEM, "tiny")
    keys = [c.key() for c in cands]
    plan = dict(zip(keys, faults, strict=False))  # the first len(faults) candidates are faulty
    monkeypatch.setenv("MOETUNE_FAULTS", json.dumps(plan))
    journal = tmp_path / "j.jsonl"
    result = run_sweep(PROBLEM, PLATFORM, cands, batch_sizes=[M], journal_path=journal,
                       space_name="tiny", execution=execution)  # fmt: skip
    records = {r["candidate"]: r for r in read_journal(journal).records if "candidate" in r}
    _, entries = best_entries([journal])
    winner = result.batches[0].best
    assert winner is not None, "healthy candidates remain: the sweep must still pick one"
    assert winner["winner"] not in plan
    assert entries[M] not in [records[k]["config"] for k in plan]
    return {fault: records[key] for key, fault in plan.items()}


def test_in_process_faults_are_recorded_with_reasons(tmp_path, monkeypatch):
    faults = ["compile", "resources", "nan", "wrong", "unwritten"]
    got = _sweep(tmp_path, faults, monkeypatch, Execution())
    assert got["compile"]["status"] == "failed" and "CompilationError" in got["compile"]["reason"]
    assert got["resources"]["status"] == "failed"
    assert got["resources"]["reason"].startswith("out of resources")
    assert got["nan"]["status"] == "rejected" and "NaN" in got["nan"]["reason"]
    assert got["wrong"]["status"] == "rejected" and "relative error" in got["wrong"]["reason"]
    assert got["unwritten"]["status"] == "rejected"
    assert got["unwritten"]["check"]["poison_rows"] == 1


@pytest.mark.slow
def test_worker_crash_and_hang_are_isolated(tmp_path, monkeypatch):
    """A crashing and a hanging candidate each cost one failed record and a new worker; so does
    one whose worker dies in the middle of writing a result (half a message on its pipe: the
    driver must take it as a crash, neither raise nor wait for the rest)."""
    faults = ["crash", "torn", "hang", "nan"]
    got = _sweep(tmp_path, faults, monkeypatch, Execution(isolate=True, timeout_s=20))
    for fault in ("crash", "torn"):
        assert got[fault]["status"] == "failed"
        assert "worker crashed (exit code 139)" in got[fault]["reason"]
    assert got["hang"]["status"] == "failed" and got["hang"]["reason"].startswith("timeout")
    assert got["nan"]["status"] == "rejected"


@pytest.mark.slow
def test_ray_backend_runs_and_isolates_a_crash(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray

    try:
        got = _sweep(tmp_path, ["crash", "wrong"], monkeypatch,
                     Execution(backend="ray", timeout_s=60))  # fmt: skip
    finally:
        ray.shutdown()
    assert got["crash"]["status"] == "failed" and "worker crashed" in got["crash"]["reason"]
    assert got["wrong"]["status"] == "rejected"


def test_gpu_indices_follow_the_users_visible_devices(monkeypatch):
    """--gpus 0,1 under CUDA_VISIBLE_DEVICES=4,6 must mean physical GPUs 4 and 6."""
    from moetune.workers import chunk_pairs, visible_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [visible_device(0), visible_device(1)] == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_device(3) == "3"
    pairs = [("a", {}, 1, 5), ("a", {}, 8, 5), ("a", {}, 16, 5), ("b", {}, 1, 5)]
    assert [[p[0] for p in c] for c in chunk_pairs(pairs, 2)] == [["a", "a"], ["a"], ["b"]]
