"""Compile a sweep's candidates in background processes while the sweep evaluates them.

Triton keeps compiled kernels in its on-disk cache, keyed by the source, the constexprs and the
specialization of the integer arguments (divisibility by 16), and the target GPU (not the
device). Compile processes run the op in compile-only mode (the GEMMs go through Triton's
``warmup``: compiled, never launched; the op's routing, activation and quantization run in
PyTorch on CPU tensors of a 16-token problem) once per candidate with the sweep's N, K and
strides, and report each candidate as it is done. On NVIDIA, Triton is told the sweep's GPU
target, so they do not initialise CUDA; where that does not work (AMD, another Triton), they
fall back to Triton asking the GPU (a context, nothing launched), then to GPU inputs (a first
candidate that fails on its own also tries every way, leaving that process a CUDA context). The
sweep's workers take a candidate's work only once it is reported, and then load its kernels
from the cache: compiling (CPU-bound) and timing (GPU-bound) overlap instead of one
waiting for the other. A candidate that fails to compile here is left for the sweep to record
with its reason; if compiling stalls, the sweep stops waiting and compiles what is missing itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from moetune.cores import calm, compile_cpus, compile_nice, usable_cpus
from moetune.problem import Problem
from moetune.procs import context, keep_to_self, messages, start_helper, with_env
from moetune.workers import visible_device

_WAYS = {"target": "without CUDA", "cpu": "from CPU tensors", "cuda": "from GPU inputs"}
STALL_S = 300.0  # no candidate reported for this long: stop waiting for the rest


def default_compile_workers(gpus: int, cpus: int | None = None) -> int:
    """Compile processes for a sweep on ``gpus`` GPUs: 16, and 4 more per extra GPU, at most
    one per logical CPU the sweep may use. 16 per GPU (64 on 4x H100) slowed every process's
    start to 22-27 s and each timed pair by 9.5%; 16 compile the full space (1,304 candidates)
    in 95 s, faster than four GPUs evaluate it (results/full-space-0.2/)."""
    return max(1, min(cpus or usable_cpus(), 16 + 4 * (gpus - 1)))


def pin_target(capability: int, active: Any = None) -> Callable[[], None]:
    """Make Triton compile for ``sm<capability>`` without asking a GPU; returns the undo.

    Triton asks its driver for the current device, stream and target before it compiles (from
    ``warmup`` too), and PyTorch's answers initialise CUDA: each compile process then held a
    CUDA context on a GPU being timed, and 68 processes starting CUDA together took 22-27 s on
    4x H100 (results/full-space-0.2/). The cache key holds only the target, not the device, so
    kernels compiled here are the ones the workers load.
    """
    from triton.backends.compiler import GPUTarget

    if active is None:
        from triton.runtime import driver

        active = driver.active
    # Some Triton releases hand out a LazyProxy: pin (and undo) on the driver behind it.
    init = getattr(active, "_initialize_obj", None)
    if callable(init):
        init()
        active = getattr(active, "_obj", None) or active
    names = ("get_current_device", "get_current_stream", "get_current_target")
    saved = {name: active.__dict__.get(name) for name in names}
    active.get_current_device = lambda: 0
    active.get_current_stream = lambda device=None: 0
    active.get_current_target = lambda: GPUTarget("cuda", capability, 32)

    def undo() -> None:
        for name, value in saved.items():
            if value is None:
                active.__dict__.pop(name, None)
            else:
                setattr(active, name, value)

    return undo


class Pin:
    """Whether Triton compiles for a named target (``pin_target``) or asks the GPU, switched
    as the compile ways change."""

    def __init__(self, capability: int | None, active: Any = None) -> None:
        self.capability, self.active = capability, active
        self.undo: Callable[[], None] | None = None

    def set(self, on: bool) -> None:
        if on and self.undo is None:
            if self.capability is None:
                raise RuntimeError("no target to pin")
            self.undo = pin_target(self.capability, self.active)
        elif not on and self.undo is not None:
            self.undo()
            self.undo = None


class Ladder:
    """Ways to compile, cheapest first. Until one has worked, a failure tries the later ways and
    the first that works is kept (the earlier ones are dropped); once one has worked, a failure
    is the candidate's own."""

    def __init__(self, ways: list[str]) -> None:
        self.ways, self.proven = list(ways), False

    def compile(self, run: Callable[[str], None]) -> tuple[str, str]:
        """``run(way)`` in the ladder's order: ("compiled", the way that worked) or ("failed",
        the ladder's current first way)."""
        for i, way in enumerate(self.ways if not self.proven else self.ways[:1]):
            try:
                run(way)
            except Exception:
                continue
            self.ways, self.proven = self.ways[i:], True
            return "compiled", way
        return "failed", self.ways[0]


def compile_inputs(
    problem: Problem, device: str, fp8: Any, act_scales: str = "dynamic",
    max_m: int | None = None,
) -> list[tuple[tuple, dict]]:  # fmt: skip
    """The inputs a compile process runs a candidate on, so that it builds every kernel variant
    the sweep's op launches: 16 tokens; with static fp8 scales one set at or below
    ``ops.FUSE_GEMM1_STATIC_FP8_MAX_M`` and one above it, where GEMM1 runs without the fused
    epilogue; with ``ops.SUM_TOPK_IN_GEMM2_MIN_M`` set (top-k > 1) a set on each side of it,
    where GEMM2 stores slot rows or sums them (a large limit makes a large problem to compile
    from: its routing and activation run in PyTorch on CPU for each candidate); with
    ``ops.DIRECT_SLOTS_MAX_M`` set, one token, whose GEMM1 on direct slots may build another
    kernel: a late trigger (:func:`moetune.launch.late_trigger`), or no dependent launch flag
    (:func:`moetune.ops.gemm1_dependent`; the flag is part of Triton's compile key); with
    ``ops.SORTED_MIN_M`` or ``ops.SORTED_INPUT_MIN_M`` set, or ``ops.SORTED_AUTO_MIN_M`` for a
    problem its rule takes, a set of that many tokens, where the GEMMs read or write rows at the
    routing's sorted positions (other kernels again), unless the sweep's largest batch size
    ``max_m`` stays below it (None: no bound)."""
    import torch

    from moetune import ops
    from moetune.inputs import random_moe_inputs

    sizes = [16]
    limit = ops.FUSE_GEMM1_STATIC_FP8_MAX_M
    if act_scales == "static" and problem.quant == "fp8_w8a8" and limit is not None:
        sizes = [max(1, min(16, limit)), limit + 1]  # one at or below it, one above
    if ops.DIRECT_SLOTS_MAX_M:
        sizes.append(1)
    start = ops.SUM_TOPK_IN_GEMM2_MIN_M
    if start is not None and problem.topk > 1:
        sums = {ops.sum_topk_in_gemm2(M, problem.topk) for M in sizes}
        if True not in sums:
            sizes.append(start)
        if False not in sums and start > 1:
            sizes.append(start - 1)
    starts = [ops.SORTED_MIN_M, ops.SORTED_INPUT_MIN_M]
    limit = ops.SORTED_AUTO_MIN_M
    if limit is not None and ops.sorted_auto(
        limit, problem.topk, quant=problem.quant, same_block_m=True, tma=lambda: True
    ):  # may fire
        starts.append(limit)
    for start in starts:
        if start is not None and max(sizes) < start and (max_m is None or start <= max_m):
            sizes.append(start)
    sets = []
    for M in sorted(set(sizes)):
        args, kw = random_moe_inputs(problem, M, device, seed=0, fp8_dtype=fp8)
        if act_scales == "static":  # the kernels depend on the scales' presence, not values
            one = torch.ones(1, dtype=torch.float32, device=device)
            kw.update(a1_scale=one, a2_scale=one.clone())
        sets.append((args, kw))
    return sets


def _compile_loop(
    problem: Problem, fp8_dtype: str, capability: int | None, nice: int, tasks: Any, results: Any,
    act_scales: str = "dynamic", max_m: int | None = None,
) -> None:  # fmt: skip
    keep_to_self(results)
    import torch

    from moetune.launch import compile_only
    from moetune.ops import fused_experts

    # Below the workers being timed: on a 4-GPU host, 64 compile processes at normal priority
    # made each timed pair ~14% slower (measured on 4x H100, results/full-space/). The parent
    # sets ``nice`` at spawn (cores.calm); this covers a parent that could not.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(max(0, nice - os.getpriority(os.PRIO_PROCESS, 0)))
    torch.set_num_threads(1)  # one process per core at most
    # Only topk experts: expert count is not a kernel argument, the weight strides stay the same.
    small = dataclasses.replace(problem, E=problem.topk)
    fp8 = getattr(torch, fp8_dtype)
    # Ways, cheapest first: "target" compiles from CPU tensors for the sweep's GPU named to
    # Triton (no CUDA at all in this process); "cpu" from CPU tensors with Triton asking the GPU
    # (a CUDA context, nothing launched); "cuda" from GPU inputs. The op's routing, activation
    # and quantization run in PyTorch on the inputs' device.
    pin = Pin(capability)
    ways = ["cpu", "cuda"] if capability is None else ["target", "cpu", "cuda"]
    inputs: dict[str, Any] = {}

    def run(way: str, config: dict) -> None:
        pin.set(way == "target")
        device = "cuda" if way == "cuda" else "cpu"
        if device not in inputs:
            inputs[device] = compile_inputs(small, device, fp8, act_scales, max_m)
        try:
            with compile_only():
                for args, kw in inputs[device]:
                    fused_experts(*args, config=config, **kw)
        except Exception:
            if device == "cuda":  # free the GPU being timed of inputs this way may not use again
                inputs.pop("cuda", None)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            raise

    ladder = Ladder(ways)
    parent = mp.parent_process()  # None when run in the sweep's own process (tests)
    while True:
        # The sweep killed (kill -9): stop, even with candidates still queued.
        if parent is not None and not parent.is_alive():
            return
        try:
            item = tasks.get(timeout=5)
        except queue.Empty:
            continue
        if item is None:
            return
        key, config = item
        kind, way = ladder.compile(lambda w: run(w, config))  # noqa: B023
        results.send((kind, key, way))  # on this process's own pipe (see Compiler)


class Compiler:
    """Background compile processes spread over ``gpus``; ``ready(key)`` says whether a
    candidate's kernels are in the cache (or its compile failed, or compiling gave up)."""

    def __init__(
        self, problem: Problem, items: list[tuple[str, dict]], fp8_dtype: str, workers: int,
        gpus: list[int] | None = None, capability: int | None = None,
        act_scales: str = "dynamic", max_m: int | None = None,
    ) -> None:  # fmt: skip
        self.pending = {key for key, _ in items}
        self.compiled = self.failed = 0
        self.t0 = self.last = time.time()
        self.first_s: float | None = None  # when the first candidate was reported
        self.ways: Counter[str] = Counter()  # how candidates were compiled (see _compile_loop)
        self.procs: list[Any] = []
        ctx = context()
        self.tasks = ctx.Queue()
        # One result pipe per process, never a queue shared by all: a process that dies while
        # writing to a shared queue can leave its lock held, and every other process's reports
        # then wait behind it (as moetune.workers found with its workers).
        self.pipes: list[Any] = []
        for item in items:
            self.tasks.put(item)
        n = min(workers, len(items))
        for _ in range(n):
            self.tasks.put(None)
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [visible_device(g) for g in (gpus or [0])]
        # One physical core per GPU worker and one for the sweep's process stay free of them.
        self.cpus = compile_cpus(len(devices) + 1, n) if n else None
        self.confined = 0  # processes kept to ``self.cpus``
        nice = compile_nice()
        try:
            for i in range(n):
                os.environ["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]  # at spawn
                mine, theirs = ctx.Pipe(duplex=False)
                p = ctx.Process(target=with_env, daemon=True,
                                args=(dict(os.environ), _compile_loop, problem, fp8_dtype,
                                      capability, nice, self.tasks, theirs,
                                      act_scales, max_m))  # fmt: skip
                self.pipes.append(mine)  # closed by close(), also when the start fails
                try:
                    start_helper(p)
                finally:
                    theirs.close()  # the child holds its own copy: EOF once it exits
                self.confined += calm(p.pid, self.cpus, nice)  # before its imports, not after
                self.procs.append(p)
        except OSError:  # no processes to be had: the sweep compiles as it goes
            self.close()
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def ready(self, key: str) -> bool:
        """Whether ``key`` may be evaluated now; ``ready("")`` only takes in news."""
        if not key:
            self.poll()
            return True
        return key.rsplit(":", 1)[-1] not in self.pending  # "up:<key>" waits for "<key>"

    def poll(self) -> None:
        for conn, msg in messages(self.pipes, 0):
            if msg is None:  # its process exited or died mid-report
                self.pipes.remove(conn)
                continue
            kind, key, where = msg
            self.pending.discard(key)
            self.last = time.time()
            if self.first_s is None:
                self.first_s = self.last - self.t0
            if kind == "compiled":
                self.compiled += 1
                self.ways[where] += 1
            else:
                self.failed += 1
        gave_up = time.time() - self.last > STALL_S
        if self.pending and (gave_up or not any(p.is_alive() for p in self.procs)):
            self.pending.clear()  # the sweep's workers compile what is missing
            self.close()

    def timeline(self) -> str:
        """When the first and the last candidate were reported, and how they were compiled."""
        if self.first_s is None:
            return "none reported"
        how = [f"{n} {_WAYS.get(way, way)}" for way, n in self.ways.most_common()]
        if self.cpus and self.confined:
            how.append(f"on {len(self.cpus)} CPUs kept apart from the workers")
        return (f"first after {self.first_s:.1f} s, last after {self.last - self.t0:.1f} s"
                + (f" ({', '.join(how)})" if how else ""))  # fmt: skip

    def wait(self) -> None:
        """Block until every candidate is reported (for backends that cannot wait per chunk)."""
        while self.pending:
            self.poll()
            time.sleep(0.1)

    def close(self) -> None:
        # Tasks never read stay in the queue's pipe; without this the interpreter would wait at
        # exit for a feeder thread blocked on a full pipe.
        self.tasks.cancel_join_thread()
        for conn in self.pipes:
            conn.close()
        self.pipes = []
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.procs = []
