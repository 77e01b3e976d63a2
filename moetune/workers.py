"""Running a sweep's (candidate, batch size) work in worker processes, one per GPU.

Why processes: a candidate can corrupt the CUDA context (an illegal memory access poisons every
later call in that process), hang, or kill its process. Each worker evaluates chunks of work
sent by the driver, which alone writes the journal. When a worker dies or a pair runs past the
timeout, the driver records that pair as failed with the reason, requeues the rest of the chunk
and starts a fresh worker on the same GPU; the sweep goes on.

Chunks hold consecutive pairs of one candidate, so a worker reuses its compiled kernel, and the
shared queue of chunks balances the GPUs (not one whole batch size per GPU).

Each worker sends its results back on a pipe of its own, never on one queue shared by all: a
process that dies while writing to a shared ``multiprocessing.Queue`` can leave the queue's lock
held and half a message in its pipe, and every later worker then blocks behind it (a crashed
candidate once froze a whole sweep that way). A dead worker's pipe is read to its last complete
message and dropped with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moetune.procs import context, keep_to_self, messages, start_helper, with_env

Pair = tuple[str, dict[str, Any], int, int]  # (candidate key, config, batch size, replays)
OnRecord = Callable[[dict[str, Any]], None]
# A worker holds at most this many chunks: the one it works on and the next, so it never waits
# for the driver between chunks.
CHUNKS_IN_FLIGHT = 2
AFFINITY_WINDOW = 16  # ready chunks looked at for one of the worker's own candidate
EXIT_CUDA_FATAL = 3


def visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for GPU ``index`` as this process numbers its GPUs (a user
    who already narrowed CUDA_VISIBLE_DEVICES keeps that numbering in --gpus)."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current:
        entries = [e.strip() for e in current.split(",") if e.strip()]
        if index < len(entries):
            return entries[index]
    return str(index)


def chunk_pairs(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Consecutive pairs of the same candidate, at most ``size`` per chunk."""
    chunks: list[list[Pair]] = []
    for pair in pairs:
        if chunks and len(chunks[-1]) < size and chunks[-1][-1][0] == pair[0]:
            chunks[-1].append(pair)
        else:
            chunks.append([pair])
    return chunks


def worker_main(
    wid: int, problem_d: dict, platform_key: str, device: str, batch_sizes: list[int],
    skew: str, act_scales: str, tasks: Any, results: Any,
) -> None:  # fmt: skip
    """Worker process: build the inputs once, then evaluate chunks until told to stop."""
    entered = time.time()
    keep_to_self(results)
    import torch

    from moetune.evaluate import Workload, evaluate, is_fatal
    from moetune.platform import get_platform
    from moetune.problem import Problem

    imported = time.time()
    if device == "cuda":  # the context on its own, so start-up phases can be told apart
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    context_at = time.time()
    bs = problem_d.get("block_shape")
    problem = Problem(**{**problem_d, "block_shape": tuple(bs) if bs else None})
    workload = Workload(problem, get_platform(platform_key), batch_sizes, device, skew, act_scales)
    if device == "cuda":
        torch.cuda.synchronize()
    phases = {"entered": entered, "imports_s": imported - entered,
              "cuda_s": context_at - imported, "inputs_s": time.time() - context_at}  # fmt: skip
    results.send(("ready", wid, phases))
    _RESULTS[0] = results  # for the "torn" fault of moetune.faults
    parent = mp.parent_process()  # the driver, watched from the start (not a later getppid)
    while True:
        if parent is not None and not parent.is_alive():  # killed: do not linger on the GPU
            return
        try:
            chunk = tasks.get(timeout=5)
        except queue.Empty:
            continue
        if chunk is None:
            return
        for key, config, M, replays in chunk:
            rec = evaluate(workload, config, M, replays=replays, key=key)
            results.send(("done", wid, (key, M, rec)))  # written when send returns
            if is_fatal(rec):  # a finalist's re-check too: it runs after the timing
                # The context is gone: let the driver start a new worker.
                os._exit(EXIT_CUDA_FATAL)


# The running worker's result pipe (a one-element list, set in worker_main).
_RESULTS: list[Any] = [None]


def results_pipe() -> Any:
    """The result pipe of the worker this runs in (None elsewhere): moetune.faults uses it."""
    return _RESULTS[0]


def _chunks_left(slot: _Slot) -> int:
    return sum(1 for e in slot.ends if e > slot.next_index)


def _take_ready(
    todo: deque, ready: Callable[[str], bool] | None, mine: str | None = None,
    others: frozenset[str] = frozenset(),
) -> list[Pair] | None:  # fmt: skip
    """A chunk of ``todo`` whose candidates are all ready (removed from ``todo``): within the
    first AFFINITY_WINDOW ready chunks, one of ``mine`` (the candidate the worker had last),
    else one of a candidate no other worker holds (``others``), else the first ready one.

    A candidate's 18 batch sizes come in 3 chunks; when they went to different workers, each
    loaded the kernels again: its first pair there took 13 ms more (4x H200,
    results/full-space-0.4/)."""
    first = spare = None
    seen = 0
    for i, chunk in enumerate(todo):
        if ready is not None and not all(ready(key) for key, *_ in chunk):
            continue
        key = chunk[0][0]
        if key == mine:
            first = i
            break
        if first is None:
            first = i
        if spare is None and key not in others:
            spare = i
            if mine is None:
                break
        seen += 1
        if seen >= AFFINITY_WINDOW:
            break
    if first is None:
        return None
    pick = first if todo[first][0][0] == mine or spare is None else spare
    chunk = todo[pick]
    del todo[pick]
    return chunk


@dataclass
class _Slot:
    gpu: str | None
    proc: Any = None
    tasks: Any = None
    results: Any = None  # the driver's end of this worker's result pipe; None once it broke
    chunk: list[Pair] = field(default_factory=list)  # the chunks it holds, back to back
    ends: list[int] = field(default_factory=list)  # where each held chunk ends in ``chunk``
    next_index: int = 0  # first pair of the chunk without a result
    since: float = 0.0  # when that pair started (last result, or the chunk's assignment)
    ready: bool = False
    was_ready: bool = False  # this slot's first worker got ready (restarts are not start-up)
    started: float = 0.0  # when its worker process was asked for
    last_key: str | None = None  # candidate of the last chunk handed to it (its kernels loaded)


class WorkerPool:
    """Local worker processes; ``gpus`` None means one CPU worker (interpreter, tests)."""

    def __init__(
        self, problem_d: dict, platform_key: str, device: str, batch_sizes: list[int],
        skew: str, gpus: list[int] | None, timeout_s: float, act_scales: str = "dynamic",
    ) -> None:  # fmt: skip
        self.args = (problem_d, platform_key, device, batch_sizes, skew, act_scales)
        self.timeout_s = timeout_s
        self.ctx = context()
        self.slots = [_Slot(str(g) if g is not None else None) for g in (gpus or [None])]
        self.restarts = 0
        self.start_failures = 0
        self.t0 = time.time()
        self.ready_after: list[float] = []  # seconds from the pool's start to each first ready
        self.phases: list[dict[str, float]] = []  # where each first start-up went (worker_main)
        try:
            for wid in range(len(self.slots)):
                self._start(wid)
        except BaseException:
            # A stop signal (raised once a start ends, procs.start_helper) must not orphan the
            # workers already started: one still unpickling its start-up data when the sweep
            # exits finds the queue's semaphore gone and prints a traceback. close() joins it.
            self.close()
            raise

    def startup_note(self, forked: bool = False) -> str:
        """ "workers ready after 6.9-7.0 s (...; slowest: start 0.1 s, imports 0.0 s, CUDA 1.2 s,
        inputs 0.4 s)": when the first workers got ready, and where the slowest one's time went
        (its process starting, imports, the CUDA context, the inputs)."""
        how = ["forked from a server that imported torch once"] if forked else []
        if self.phases:
            slow = max(self.phases, key=lambda p: sum(p.values()))
            labels = {"start_s": "start", "imports_s": "imports", "cuda_s": "CUDA",
                      "inputs_s": "inputs"}  # fmt: skip
            parts = [f"{label} {slow[k]:.1f} s" for k, label in labels.items() if k in slow]
            how.append("slowest: " + ", ".join(parts))
        lo, hi = min(self.ready_after, default=0), max(self.ready_after, default=0)
        note = f" ({'; '.join(how)})" if how else ""
        return f"workers ready after {lo:.1f}-{hi:.1f} s{note}"

    def _start(self, wid: int) -> None:
        slot = self.slots[wid]
        slot.tasks = self.ctx.Queue()
        if slot.results is not None:
            slot.results.close()
        slot.results, child_end = self.ctx.Pipe(duplex=False)
        slot.started = time.time()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if slot.gpu is not None:  # the child inherits it at spawn
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(int(slot.gpu))
        try:
            slot.proc = self.ctx.Process(
                target=with_env,
                args=(dict(os.environ), worker_main, wid, *self.args, slot.tasks, child_end),
                daemon=True,
            )
            start_helper(slot.proc)
        finally:
            child_end.close()  # the child holds its own copy: EOF once it exits
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        slot.ready, slot.chunk, slot.ends, slot.next_index = False, [], [], 0
        slot.last_key = None  # a new process has no kernels loaded

    def run(
        self, chunks: list[list[Pair]], on_record: OnRecord,
        ready: Callable[[str], bool] | None = None,
    ) -> None:  # fmt: skip
        """Evaluate ``chunks``; a chunk is handed out only once ``ready(key)`` holds for all its
        candidates (compiled ahead), and each worker holds at most two chunks, so it never
        waits for the driver between them."""
        todo = deque(chunks)
        while todo or any(s.chunk for s in self.slots):
            # First: a worker that died while it held nothing (e.g. between two runs of a reused
            # pool) is replaced before it is handed a chunk, which would be blamed on it.
            for wid, slot in enumerate(self.slots):
                self._police(wid, slot, todo, on_record)
            if ready is not None:
                ready("")  # let the gate take in news (compiles finished) once per round
            for slot in self.slots:
                if slot.ready and todo and _chunks_left(slot) < CHUNKS_IN_FLIGHT:
                    others = frozenset(p[0] for o in self.slots if o is not slot
                                       for p in o.chunk[o.next_index :])  # fmt: skip
                    chunk = _take_ready(todo, ready, slot.last_key, others)
                    if chunk is None:
                        break
                    slot.last_key = chunk[-1][0]
                    if slot.next_index >= len(slot.chunk):
                        slot.since = time.time()
                    slot.ends = [e - slot.next_index for e in slot.ends if e > slot.next_index]
                    slot.chunk = slot.chunk[slot.next_index :] + chunk
                    slot.next_index = 0
                    slot.ends.append(len(slot.chunk))
                    slot.tasks.put(chunk)
            self._drain(on_record, wait=0.05 if todo else 0.2)

    def _drain(self, on_record: OnRecord, wait: float) -> None:
        """Take in every message waiting on the workers' pipes, waiting up to ``wait`` s for one."""
        slots = {id(s.results): s for s in self.slots if s.results is not None}
        if not slots:
            time.sleep(wait)
            return
        for conn, msg in messages([s.results for s in slots.values()], wait):
            slot = slots[id(conn)]
            if msg is None:  # its worker exited or died mid-message: the police replace it
                slot.results = None
                if slot.proc.is_alive():  # an unreadable message from a live worker: same
                    slot.proc.kill()
            else:
                self._take(slot, msg, on_record)

    def _take(self, slot: _Slot, msg: tuple, on_record: OnRecord) -> None:
        kind, wid, payload = msg
        if kind == "ready":
            slot.ready = True
            if not slot.was_ready:
                self.ready_after.append(round(time.time() - self.t0, 1))
                if isinstance(payload, dict):
                    self.phases.append({"start_s": payload["entered"] - slot.started,
                                        **{k: v for k, v in payload.items()
                                           if k.endswith("_s")}})  # fmt: skip
            slot.was_ready = True
        elif kind == "done" and slot.chunk:
            key, M, rec = payload
            on_record({"candidate": key, "M": M, "config": slot.chunk[slot.next_index][1],
                       "worker": wid, "gpu": slot.gpu, **rec})  # fmt: skip
            slot.next_index += 1
            slot.since = time.time()
            if slot.next_index >= len(slot.chunk):
                slot.chunk, slot.ends = [], []

    def _police(self, wid: int, slot: _Slot, todo: deque, on_record: OnRecord) -> None:
        dead = not slot.proc.is_alive()
        late = bool(slot.chunk) and time.time() - slot.since > self.timeout_s
        if not dead and not late:
            return
        if dead and not slot.ready:
            self.start_failures += 1
            if self.start_failures > 3:
                raise RuntimeError(
                    f"worker processes keep dying before they are ready "
                    f"(last exit code {slot.proc.exitcode}); see their output above"
                )
        if dead:
            self._drain(on_record, wait=0.5)  # results it sent before dying still count
        if late and not dead:
            slot.proc.kill()
        slot.proc.join(timeout=10)
        if slot.chunk:
            key, config, M, _ = slot.chunk[slot.next_index]
            if late and not dead:
                reason = f"timeout: no result after {self.timeout_s:.0f} s; worker killed"
            elif slot.proc.exitcode == EXIT_CUDA_FATAL:
                reason = "worker lost its CUDA context"
            else:
                reason = f"worker crashed (exit code {slot.proc.exitcode})"
            if not (dead and slot.proc.exitcode == EXIT_CUDA_FATAL):
                on_record({"candidate": key, "M": M, "config": config, "worker": wid,
                           "gpu": slot.gpu, "status": "failed", "reason": reason})  # fmt: skip
                slot.next_index += 1
            rest = slot.chunk[slot.next_index :]
            if rest:
                todo.appendleft(rest)
        self.restarts += 1
        self._start(wid)

    def close(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.is_alive():
                slot.tasks.put(None)
        deadline = time.time() + 10
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.join(timeout=max(0.1, deadline - time.time()))
                if slot.proc.is_alive():
                    slot.proc.kill()
            if slot.results is not None:
                slot.results.close()
                slot.results = None
