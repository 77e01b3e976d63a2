"""Finalists are re-timed and re-checked on fresh inputs where they ran; the winner is the
fastest finalist whose re-check passed, and the sweep's own process builds no inputs for it."""

import json
from pathlib import Path

from moetune import runner, sweep
from moetune.journal import read_journal
from moetune.platform import get_platform
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import Execution, run_sweep

PROBLEM = Problem(4, 32, 64, 2, "float16")
PLATFORM = get_platform("interpreter")
M = 16


def _count_workloads(monkeypatch) -> list[bool]:
    """Inputs built in the sweep's own process (by the runner or to pick winners)."""
    built: list[bool] = []
    real = sweep.Workload

    def counting(*args, **kwargs):
        built.append(kwargs.get("timing", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "Workload", counting)
    monkeypatch.setattr(runner, "Workload", counting)
    return built


def _run(journal: Path, candidates):
    return run_sweep(PROBLEM, PLATFORM, candidates, batch_sizes=[M], journal_path=journal,
                     space_name="tiny", execution=Execution())  # fmt: skip


def test_winner_takes_the_recheck_its_worker_made(tmp_path, monkeypatch):
    from moetune import evaluate

    candidates = search_space(PLATFORM, PROBLEM, "tiny")[:6]
    built = _count_workloads(monkeypatch)
    seeds: list[int] = []
    real_recheck = evaluate.recheck

    def spy(problem, workload, config, M, seed, config_down=None):
        seeds.append(seed)
        return real_recheck(problem, workload, config, M, seed, config_down)

    monkeypatch.setattr(evaluate, "recheck", spy)
    journal = tmp_path / "j.jsonl"
    result = _run(journal, candidates)
    records = read_journal(journal).records
    finals = [r for r in records if r.get("phase") == "final" and r["status"] == "ok"]
    assert finals and all(r["recheck"]["ok"] for r in finals)
    winner = result.batches[0].best
    assert winner is not None
    mine = next(r for r in finals if r["candidate"] == f"final:{winner['winner']}")
    assert winner["recheck"] == mine["recheck"]
    assert winner["timing"] == min((r["timing"] for r in finals), key=lambda t: t["median_us"])
    # One set of inputs, the runner's (with timing sets): none built to re-check the winner.
    assert built == [True]
    # Each finalist was re-checked once, on fresh inputs: the re-check seed, not the check's.
    assert seeds == [evaluate.RECHECK_SEED + M] * len(finals)


def test_each_finalist_is_timed_after_its_recheck(monkeypatch):
    """The re-check draws and frees a fresh input set; timed after it, every finalist is timed
    in the state the others were, first-pass records are timed without one."""
    from moetune import evaluate

    calls: list[str] = []
    real_recheck, real_time = evaluate.recheck, evaluate.time_op

    def recheck(*args, **kwargs):
        calls.append("recheck")
        return real_recheck(*args, **kwargs)

    def time_op(*args, **kwargs):
        calls.append("time")
        return real_time(*args, **kwargs)

    monkeypatch.setattr(evaluate, "recheck", recheck)
    monkeypatch.setattr(evaluate, "time_op", time_op)
    workload = evaluate.Workload(PROBLEM, PLATFORM, [M], "cpu")
    config = search_space(PLATFORM, PROBLEM, "tiny")[0].as_config()
    for key in ("final:a", "a"):
        record = evaluate.evaluate(workload, config, M, replays=1, key=key)
        assert record["status"] == "ok", record
        assert ("recheck" in record) is key.startswith("final:")
    assert calls == ["recheck", "time", "time"]


def test_finalists_without_a_recheck_are_rechecked_by_the_sweep(tmp_path, monkeypatch):
    """Journals written before finalists carried their re-check still resume to a winner."""
    candidates = search_space(PLATFORM, PROBLEM, "tiny")[:6]
    journal = tmp_path / "j.jsonl"
    first = _run(journal, candidates).batches[0].best
    lines = journal.read_text().splitlines()
    kept = [lines[0]]
    for line in lines[1:]:
        rec = json.loads(line)
        if rec.get("kind") == "winner":
            continue
        rec.pop("recheck", None)
        kept.append(json.dumps(rec))
    journal.write_text("\n".join(kept) + "\n")
    built = _count_workloads(monkeypatch)
    again = _run(journal, candidates).batches[0].best
    assert again is not None and again["winner"] == first["winner"]
    assert again["recheck"]["ok"]
    assert built == [False]  # re-check inputs only, no timing sets


def test_a_pool_serves_the_whole_sweep_and_rechecks_finalists_on_its_workers(tmp_path, monkeypatch):
    """Worker processes: one pool for halving's two rounds, the defaults and the finalists; the
    finalists come back re-checked from the workers, the sweep's process builds no inputs."""
    created: list[int] = []
    real_pool = runner.WorkerPool

    class Counted(real_pool):
        def __init__(self, *args, **kwargs):
            created.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runner, "WorkerPool", Counted)
    built = _count_workloads(monkeypatch)
    candidates = search_space(PLATFORM, PROBLEM, "tiny")[:4]
    journal = tmp_path / "j.jsonl"
    execution = Execution(isolate=True, strategy="halving", keep=0.5, timeout_s=120)
    result = run_sweep(PROBLEM, PLATFORM, candidates, batch_sizes=[1, 2, 3, 4],
                       journal_path=journal, space_name="tiny", execution=execution)  # fmt: skip
    records = read_journal(journal).records
    finals = [r for r in records if r.get("phase") == "final"]
    assert created == [1]
    assert finals and all(r["status"] == "ok" and r["recheck"]["ok"] for r in finals)
    assert all(b.best is not None for b in result.batches)
    assert built == []  # the sweep's own process drew nothing: workers did all of it


def test_a_fatal_error_in_a_recheck_retires_the_worker():
    from moetune.evaluate import is_fatal

    ok = {"status": "ok", "recheck": {"ok": True, "reason": ""}}
    assert not is_fatal(ok) and not is_fatal({"status": "ok"})
    assert not is_fatal({"status": "rejected", "reason": "check failed: relative error 0.3"})
    assert is_fatal({"status": "failed", "reason": "RuntimeError: CUDA error: misaligned"})
    lost = {"status": "ok", "recheck": {"ok": False, "reason": "an illegal memory access"}}
    assert is_fatal(lost)
    assert not is_fatal({"status": "ok", "recheck": {"ok": False, "reason": "relative error"}})


def test_finalists_add_the_incumbent_only_when_it_ranked_below_them():
    ranked = [{"candidate": f"c{i}", "config": {"BLOCK_SIZE_M": i},
               "timing": {"median_us": 10.0 + i}} for i in range(8)]  # fmt: skip
    n = sweep.FINALISTS
    assert sweep.finalists(ranked) == ranked[:n]
    assert sweep.finalists(ranked, {"BLOCK_SIZE_M": n + 2}) == [*ranked[:n], ranked[n + 2]]
    assert sweep.finalists(ranked, {"BLOCK_SIZE_M": 0}) == ranked[:n], "already a finalist"
    assert sweep.finalists(ranked, {"BLOCK_SIZE_M": 99}) == ranked[:n], "never passed here"
    assert sweep.finalists([], {"BLOCK_SIZE_M": 0}) == []


def test_finalists_add_the_default_only_where_it_beat_the_slowest_of_them():
    ranked = [{"candidate": f"c{i}", "config": {"BLOCK_SIZE_M": i},
               "timing": {"median_us": 10.0 + i}} for i in range(8)]  # fmt: skip
    n = sweep.FINALISTS

    def default(us: float, m: int = 99) -> dict:
        return {"candidate": "default", "config": {"BLOCK_SIZE_M": m}, "timing": {"median_us": us}}

    fast, slow = default(10.0 + n - 1.5), default(10.0 + n - 0.5)
    assert sweep.finalists(ranked, default=fast) == [*ranked[:n], fast]
    assert sweep.finalists(ranked, default=slow) == ranked[:n], "slower than every finalist"
    assert sweep.finalists(ranked, default=default(1.0, m=0)) == ranked[:n], "already a finalist"
    assert sweep.finalists(ranked[:2], default=slow) == [*ranked[:2], slow], "fewer than FINALISTS"
    held = {"BLOCK_SIZE_M": n + 2}
    assert sweep.finalists(ranked, held, fast) == [*ranked[:n], ranked[n + 2], fast]
    assert sweep.finalists([], default=fast) == [fast]


def test_a_default_faster_than_every_finalist_becomes_the_entry(tmp_path, monkeypatch):
    """The heuristic default is timed at every batch size; where its config is no candidate (a
    restricted space, or one halving did not carry on) and it beat the finalists, the sweep
    re-times and re-checks it with them, and the faster of them is the table's entry."""
    from moetune import evaluate
    from moetune.defaults import default_config
    from moetune.export import best_entries

    heuristic = default_config(M, PROBLEM.E, PROBLEM.N, PROBLEM.K, PROBLEM.topk,
                               dtype=PROBLEM.torch_dtype)  # fmt: skip
    candidates = [c for c in search_space(PLATFORM, PROBLEM, "tiny")
                  if c.as_config() != heuristic][:5]  # fmt: skip
    real = evaluate._evaluate

    def timed(workload, config, M, *, replays, key):  # the default fastest, candidates by rank
        record = real(workload, config, M, replays=replays, key=key)
        if record["status"] == "ok":
            us = 1.0 if key.endswith("default") else 2.0 + candidates.index(
                next(c for c in candidates if c.as_config() == config))  # fmt: skip
            record["timing"]["median_us"] = us
        return record

    monkeypatch.setattr(evaluate, "_evaluate", timed)
    journal = tmp_path / "j.jsonl"
    best = _run(journal, candidates).batches[0].best
    records = read_journal(journal).records
    final = [r for r in records if r.get("phase") == "final" and r["status"] == "ok"]
    assert {r["candidate"] for r in final} >= {"final:default"}
    assert best is not None and best["winner"] == "default" and best["recheck"]["ok"]
    assert best["config"] == heuristic
    assert best_entries([journal])[1][M] == heuristic
