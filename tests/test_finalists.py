"""Finalists are re-timed and re-checked on fresh inputs where they ran; the winner is the
fastest finalist whose re-check passed, and the sweep's own process builds no inputs for it."""

import json
from pathlib import Path

from moetune import sweep
from moetune.journal import read_journal
from moetune.platform import get_platform
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import Execution, run_sweep

PROBLEM = Problem(4, 32, 64, 2, "float16")
PLATFORM = get_platform("interpreter")
M = 16


def _count_workloads(monkeypatch) -> list[bool]:
    built: list[bool] = []
    real = sweep.Workload

    def counting(*args, **kwargs):
        built.append(kwargs.get("timing", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "Workload", counting)
    return built


def _run(journal: Path, candidates):
    return run_sweep(PROBLEM, PLATFORM, candidates, batch_sizes=[M], journal_path=journal,
                     space_name="tiny", execution=Execution())  # fmt: skip


def test_winner_takes_the_recheck_its_worker_made(tmp_path, monkeypatch):
    candidates = search_space(PLATFORM, PROBLEM, "tiny")[:6]
    built = _count_workloads(monkeypatch)
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
