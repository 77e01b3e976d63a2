"""Keeping compile processes off the cores of the processes being timed.

A sweep's GPU workers are single-threaded Python that launches kernels and captures CUDA graphs:
each timed pair is mostly CPU time (~15 ms at small batch sizes). While the compile processes
ran, pairs on a 4-GPU host took 3-8% longer than the same pairs on one GPU (4x H100,
results/full-space-0.3/), and compiling overlaps a larger share of a 4-GPU sweep. So the
compile processes get every physical core but one per worker and one for the sweep's own
process (when that still leaves a CPU per compile process: Linux only), and start 10 nice
levels below the sweep, their imports included. The workers are not pinned: the reserved cores
are only kept free for them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

COMPILE_NICE = 10
MIN_COMPILE_CORES = 4  # fewer than this left over: no reservation (small machines, tests)
_SYSFS = Path("/sys/devices/system/cpu")


def parse_cpu_list(text: str) -> set[int]:
    """Linux's CPU list format ("0-3,8,10-11") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def physical_cores(allowed: set[int], sysfs: Path = _SYSFS) -> list[frozenset[int]]:
    """The usable logical CPUs grouped by physical core (hyperthread siblings together), in
    CPU order; a CPU whose topology cannot be read is a core of its own."""
    groups: dict[frozenset[int], None] = {}
    for cpu in sorted(allowed):
        path = sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            siblings = parse_cpu_list(path.read_text())
        except (OSError, ValueError):
            siblings = {cpu}
        groups[frozenset((siblings & allowed) | {cpu})] = None
    return list(groups)


def compile_cpus(reserved_cores: int, processes: int, allowed: set[int] | None = None,
                 sysfs: Path = _SYSFS) -> set[int] | None:  # fmt: skip
    """The logical CPUs ``processes`` compile processes may use once ``reserved_cores``
    physical cores are left to the workers and the sweep's process; None (use every CPU) when
    that would leave fewer than MIN_COMPILE_CORES physical cores or fewer logical CPUs than
    processes (compiling would then hold the GPUs back: a halving sweep on a 16-CPU machine
    waits for its compiles)."""
    if allowed is None:
        if not hasattr(os, "sched_getaffinity"):  # not Linux
            return None
        allowed = set(os.sched_getaffinity(0))
    cores = physical_cores(allowed, sysfs)
    if len(cores) - reserved_cores < MIN_COMPILE_CORES:
        return None
    cpus: set[int] = set().union(*cores[reserved_cores:])
    return cpus if len(cpus) >= processes else None


def usable_cpus() -> int:
    """Logical CPUs this process may run on (a cgroup or taskset may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compile_nice() -> int:
    """The nice value for compile processes: COMPILE_NICE below this process's own."""
    try:
        return min(19, os.getpriority(os.PRIO_PROCESS, 0) + COMPILE_NICE)
    except (OSError, AttributeError):
        return COMPILE_NICE


def calm(pid: int, cpus: set[int] | None, nice: int) -> bool:
    """Set a just-started process's nice value and confine it to ``cpus`` (None: anywhere).
    Best effort; returns whether it was confined to ``cpus``."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    if not cpus:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
    except (OSError, AttributeError):
        return False
    return True
