"""Where a sweep's evaluation work runs: local worker processes (one per GPU, or one CPU
worker), Ray actors, or the sweep's own process.

Local workers are started once, before compiling, and serve the whole sweep (first pass,
halving's second round, defaults, finalists): a worker's start (CUDA context, inputs for every
batch size) is paid once. A split sweep starts them once more to time its winners' pairs
(moetune.pairs), after checking those winners in its own process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from moetune.evaluate import Workload, evaluate
from moetune.platform import Platform
from moetune.precompile import Compiler
from moetune.problem import Problem
from moetune.workers import OnRecord, WorkerPool, chunk_pairs

if TYPE_CHECKING:
    from moetune.sweep import Execution


class Runner:
    """Runs evaluation work where ``execution`` says. Local worker processes are started once,
    before compiling, and serve the whole sweep (first pass, halving's second round, defaults,
    finalists; a split sweep's pairs get a second start): a worker's start (CUDA context, inputs
    for every batch size) is paid once. Local
    workers take a candidate once ``compiler`` has it ready; Ray and in-process runs wait for the
    whole compile first."""

    def __init__(self, problem: Problem, platform: Platform, device: str,
                 batch_sizes: list[int], execution: Execution) -> None:  # fmt: skip
        self.problem, self.platform, self.device = problem, platform, device
        self.batch_sizes, self.execution = batch_sizes, execution
        self.pool: WorkerPool | None = None
        self.workload: Workload | None = None  # in-process runs
        self.compiler: Compiler | None = None
        self.t0 = time.time()  # the sweep's start, for --budget

    @property
    def parallel(self) -> int:
        """How many pairs run at once: one per GPU for local workers and Ray actors."""
        ex = self.execution
        return len(ex.gpus) if ex.gpus and (ex.isolate or ex.backend == "ray") else 1

    def start(self) -> None:
        """Start the local workers now, so they get ready while candidates compile."""
        if self.pool is None and self.execution.isolate and self.execution.backend != "ray":
            from moetune.sweep import problem_dict

            ex = self.execution
            self.pool = WorkerPool(problem_dict(self.problem), self.platform.key, self.device,
                                   self.batch_sizes, ex.skew, ex.gpus, ex.timeout_s,
                                   ex.act_scales)  # fmt: skip

    def run(self, work: list[tuple[str, dict[str, Any], int, int]], on_record: OnRecord) -> None:
        """Run ``work`` [(key, config, M, replays)]; never raises for a bad candidate."""
        if not work:
            return
        ex, compiler = self.execution, self.compiler
        if compiler is not None and (ex.backend == "ray" or not ex.isolate):
            compiler.wait()
        if ex.backend == "ray":
            from moetune.ray_backend import run_on_ray

            run_on_ray(self.problem, self.platform, self.device, self.batch_sizes, work, ex,
                       on_record)  # fmt: skip
        elif ex.isolate:
            self.start()
            assert self.pool is not None
            self.pool.run(chunk_pairs(work, ex.chunk_size), on_record,
                          ready=compiler.ready if compiler is not None else None)  # fmt: skip
        else:
            if self.workload is None:
                self.workload = Workload(self.problem, self.platform, self.batch_sizes,
                                         self.device, ex.skew, ex.act_scales)  # fmt: skip
            for key, config, M, replays in work:
                rec = evaluate(self.workload, config, M, replays=replays, key=key)
                on_record({"candidate": key, "M": M, "config": config, **rec})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.workload = None
