"""The worker pool's hand-out rules: chunks only for ready candidates, two chunks in flight."""

from collections import deque

import pytest

from moetune.platform import get_platform
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import problem_dict
from moetune.workers import WorkerPool, _take_ready, chunk_pairs

PROBLEM = Problem(4, 32, 64, 2, "float16")


def test_take_ready_skips_chunks_whose_candidates_are_not_ready():
    todo = deque([[("a", {}, 1, 1)], [("b", {}, 1, 1)], [("c", {}, 1, 1)]])
    assert _take_ready(todo, lambda k: k != "a")[0][0] == "b"
    assert [c[0][0] for c in todo] == ["a", "c"]
    assert _take_ready(todo, lambda k: False) is None
    assert _take_ready(todo, None)[0][0] == "a"


@pytest.mark.slow
def test_pool_waits_for_ready_candidates_and_records_every_pair_once():
    cands = search_space(get_platform("interpreter"), PROBLEM, "tiny")[:2]
    first, second = (c.key() for c in cands)
    # The second candidate's work comes first: only the gate can hold it back.
    work = [(c.key(), c.as_config(), M, 1) for c in reversed(cands) for M in (1, 2, 3)]
    seen: list[tuple[str, int]] = []

    def ready(key: str) -> bool:  # the second candidate "compiles" once the first has 3 records
        return key != second or sum(k == first for k, _ in seen) >= 3

    pool = WorkerPool(problem_dict(PROBLEM), "interpreter", "cpu", [1, 2, 3], "uniform",
                      None, timeout_s=60)  # fmt: skip
    try:
        pool.run(chunk_pairs(work, 1), lambda r: seen.append((r["candidate"], r["M"])), ready)
    finally:
        pool.close()
    assert sorted(seen) == sorted((k, M) for k, _, M, _ in work)
    assert [k for k, _ in seen[:3]] == [first] * 3, "a chunk went out before it was ready"


@pytest.mark.slow
def test_a_worker_never_holds_more_than_two_chunks():
    """One-pair chunks (finalists) must not pile up on one worker while others could take them."""
    from moetune import workers

    cands = search_space(get_platform("interpreter"), PROBLEM, "tiny")[:3]
    work = [(c.key(), c.as_config(), M, 1) for c in cands for M in (1, 2)]
    held: list[int] = []

    class Watched(WorkerPool):
        def _drain(self, on_record, wait):
            held.extend(workers._chunks_left(s) for s in self.slots)
            super()._drain(on_record, wait)

    pool = Watched(problem_dict(PROBLEM), "interpreter", "cpu", [1, 2], "uniform", None,
                   timeout_s=60)  # fmt: skip
    seen = []
    try:
        pool.run(chunk_pairs(work, 1), seen.append)
    finally:
        pool.close()
    assert len(seen) == len(work)
    assert max(held) == workers.CHUNKS_IN_FLIGHT


@pytest.mark.slow
def test_a_reused_pool_replaces_a_worker_that_died_idle_without_blaming_a_pair():
    """Between two runs of one pool (a sweep's first pass, then its finalists) a worker can die
    holding nothing: it is replaced, and the next run's pairs all come back ok."""
    import os
    import signal

    cands = search_space(get_platform("interpreter"), PROBLEM, "tiny")[:2]
    pool = WorkerPool(problem_dict(PROBLEM), "interpreter", "cpu", [1, 2], "uniform", None,
                      timeout_s=60)  # fmt: skip
    seen: list[dict] = []
    try:
        pool.run(chunk_pairs([(cands[0].key(), cands[0].as_config(), 1, 1)], 1), seen.append)
        os.kill(pool.slots[0].proc.pid, signal.SIGKILL)
        pool.slots[0].proc.join(timeout=10)
        work = [(c.key(), c.as_config(), M, 1) for c in cands for M in (1, 2)]
        pool.run(chunk_pairs(work, 2), seen.append)
    finally:
        pool.close()
    assert [r["status"] for r in seen] == ["ok"] * 5, [r.get("reason") for r in seen]
    assert pool.restarts == 1
    assert len(pool.ready_after) == 1  # start-up times: the restart is not one
    assert len(pool.phases) == 1
    assert set(pool.phases[0]) == {"start_s", "imports_s", "cuda_s", "inputs_s"}
    assert all(0 <= v < 120 for v in pool.phases[0].values()), pool.phases


def _chunks(*keys: str) -> deque:
    return deque([[(k, {}, m, 1)] for m, k in enumerate(keys)])


def test_a_worker_gets_the_next_chunk_of_its_own_candidate():
    todo = _chunks("a", "a", "b", "b", "c")
    assert _take_ready(todo, None, mine="b")[0][0] == "b"
    assert [c[0][0] for c in todo] == ["a", "a", "b", "c"]


def test_a_worker_leaves_other_workers_candidates_when_it_can():
    todo = _chunks("a", "a", "b", "c")
    assert _take_ready(todo, None, mine="x", others=frozenset({"a"}))[0][0] == "b"
    assert _take_ready(todo, None, others=frozenset({"a"}))[0][0] == "c"
    # Nothing else left: it takes another worker's candidate rather than wait.
    assert _take_ready(todo, None, others=frozenset({"a"}))[0][0] == "a"


def test_affinity_never_takes_a_chunk_that_is_not_ready():
    todo = _chunks("a", "b", "b")
    chunk = _take_ready(todo, lambda k: k != "b", mine="b", others=frozenset({"a"}))
    assert chunk[0][0] == "a"
    assert _take_ready(todo, lambda k: k != "b", mine="b") is None


def test_startup_note_names_the_slowest_workers_phases():
    pool = WorkerPool.__new__(WorkerPool)  # no processes: only the note
    pool.ready_after = [6.9, 7.0]
    pool.phases = [{"start_s": 0.1, "imports_s": 0.0, "cuda_s": 1.0, "inputs_s": 0.5},
                   {"start_s": 0.2, "imports_s": 0.0, "cuda_s": 2.5, "inputs_s": 0.4}]  # fmt: skip
    assert pool.startup_note(forked=True) == (
        "workers ready after 6.9-7.0 s (forked from a server that imported torch once; "
        "slowest: start 0.2 s, imports 0.0 s, CUDA 2.5 s, inputs 0.4 s)"
    )
    pool.phases = []
    assert pool.startup_note() == "workers ready after 6.9-7.0 s"


def test_a_stop_signal_while_starting_leaves_no_worker_behind(monkeypatch):
    """SIGTERM during the pool's start is raised once the worker's start ends (procs.start_helper):
    the pool must still stop that worker. Left behind, it kept unpickling after the sweep exited,
    found the queue's semaphore unlinked and printed a traceback on the sweep's stderr."""
    from moetune import workers

    started = []
    real = workers.start_helper

    def start_then_stop(proc):
        real(proc)
        started.append(proc)
        raise KeyboardInterrupt  # as the deferred signal is raised

    monkeypatch.setattr(workers, "start_helper", start_then_stop)
    with pytest.raises(KeyboardInterrupt):
        WorkerPool(problem_dict(PROBLEM), "interpreter", "cpu", [1], "uniform", None,
                   timeout_s=60)  # fmt: skip
    assert len(started) == 1
    assert not started[0].is_alive(), "the started worker was left running"
    assert started[0].exitcode is not None
