"""Which CPUs compile processes get: every physical core but the reserved ones, siblings kept
together, nothing reserved on small machines."""

import os

import pytest

from moetune.cores import (
    MIN_COMPILE_CORES,
    calm,
    compile_cpus,
    compile_nice,
    parse_cpu_list,
    physical_cores,
)


def _topology(tmp_path, siblings: dict[int, str]):
    for cpu, text in siblings.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return tmp_path


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}


def test_physical_cores_group_hyperthread_siblings(tmp_path):
    # 4 cores x 2 threads, Linux's usual numbering: cpu i and i+4 share a core.
    sysfs = _topology(tmp_path, {i: f"{i % 4},{i % 4 + 4}" for i in range(8)})
    assert physical_cores(set(range(8)), sysfs) == [frozenset({i, i + 4}) for i in range(4)]
    # A sibling outside the allowed set is not handed out.
    assert physical_cores({0, 1, 5}, sysfs) == [frozenset({0}), frozenset({1, 5})]


def test_compile_cpus_leave_the_first_cores_to_workers(tmp_path):
    sysfs = _topology(tmp_path, {i: f"{i % 8},{i % 8 + 8}" for i in range(16)})
    cpus = compile_cpus(3, 10, set(range(16)), sysfs)  # 2 workers + the sweep's process
    assert cpus == {3, 4, 5, 6, 7, 11, 12, 13, 14, 15}
    assert not cpus & {0, 1, 2, 8, 9, 10}, "a reserved core's sibling went to compiling"
    # 11 processes would share CPUs: compiling is then the bottleneck, nothing is reserved.
    assert compile_cpus(3, 11, set(range(16)), sysfs) is None


def test_compile_cpus_reserve_nothing_on_small_machines(tmp_path):
    sysfs = _topology(tmp_path, {i: str(i) for i in range(MIN_COMPILE_CORES + 1)})
    assert compile_cpus(2, 1, set(range(MIN_COMPILE_CORES + 1)), sysfs) is None
    assert compile_cpus(1, 1, set(range(MIN_COMPILE_CORES + 1)), sysfs) is not None


def test_unreadable_topology_counts_each_cpu_as_a_core(tmp_path):
    assert compile_cpus(2, 8, set(range(10)), tmp_path) == set(range(2, 10))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_calm_lowers_priority_below_this_process_and_confines():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_sleep)
    p.start()
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        nice = compile_nice()
        assert nice == min(19, own + 10)
        cpu = min(os.sched_getaffinity(0))
        assert calm(p.pid, {cpu}, nice)
        assert os.getpriority(os.PRIO_PROCESS, p.pid) == nice
        assert os.sched_getaffinity(p.pid) == {cpu}
        assert not calm(p.pid, None, nice), "nothing to confine to"
    finally:
        p.kill()
        p.join()


def _sleep():
    import time

    time.sleep(60)
