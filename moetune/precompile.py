"""Compile a sweep's candidates in background processes while the sweep evaluates them.

Triton keeps compiled kernels in its on-disk cache, keyed by the source, the constexprs and the
specialization of the integer arguments (divisibility by 16). Compile processes run the op in
compile-only mode (the GEMMs go through Triton's ``warmup``: compiled, never launched; the op's
routing, activation and quantization run in PyTorch on CPU tensors of a 16-token problem) once
per candidate with the sweep's N, K and strides, and report each candidate as it is done. The
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
from typing import Any

from moetune.problem import Problem
from moetune.workers import visible_device

STALL_S = 300.0  # no candidate reported for this long: stop waiting for the rest


def _compile_loop(problem: Problem, fp8_dtype: str, tasks: Any, results: Any) -> None:
    import torch

    from moetune.inputs import random_moe_inputs
    from moetune.launch import compile_only
    from moetune.ops import fused_experts

    # Below the workers being timed: on a 4-GPU host, 64 compile processes at normal priority
    # made each timed pair ~14% slower (measured on 4x H100, results/full-space/).
    with contextlib.suppress(OSError):
        os.nice(10)
    torch.set_num_threads(1)  # one core each: there are as many processes as cores
    # Only topk experts: expert count is not a kernel argument, the weight strides stay the same.
    small = dataclasses.replace(problem, E=problem.topk)
    fp8 = getattr(torch, fp8_dtype)
    # CPU tensors: Triton compiles for the current GPU from them, and the op's routing,
    # activation and quantization run in PyTorch on the CPU, so a compile process launches
    # nothing on a GPU whose workers are being timed. (It still holds a CUDA context: Triton asks
    # the device for its target and stream; measured on 4x H100, results/full-space-0.2/.) If
    # the first compiles fail from CPU tensors and succeed from GPU inputs, this Triton cannot
    # compile from CPU tensors: GPU inputs from then on. A failure after a CPU success is the
    # candidate's own.
    inputs = {"cpu": random_moe_inputs(small, 16, "cpu", seed=0, fp8_dtype=fp8)}
    where = "cpu"
    cpu_works = False

    def compile_with(device: str, config: dict) -> None:
        if device not in inputs:
            inputs[device] = random_moe_inputs(small, 16, device, seed=0, fp8_dtype=fp8)
        args, kw = inputs[device]
        with compile_only():
            fused_experts(*args, config=config, **kw)

    while True:
        item = tasks.get()
        if item is None:
            return
        key, config = item
        try:
            compile_with(where, config)
            cpu_works = cpu_works or where == "cpu"
            results.put(("compiled", key, where))
            continue
        except Exception:  # recorded later by the sweep, with its reason
            pass
        if where == "cpu" and not cpu_works:
            try:
                compile_with("cuda", config)
                where = "cuda"
                results.put(("compiled", key, where))
                continue
            except Exception:
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
        results.put(("failed", key, where))


class Compiler:
    """Background compile processes spread over ``gpus``; ``ready(key)`` says whether a
    candidate's kernels are in the cache (or its compile failed, or compiling gave up)."""

    def __init__(
        self, problem: Problem, items: list[tuple[str, dict]], fp8_dtype: str, workers: int,
        gpus: list[int] | None = None,
    ) -> None:  # fmt: skip
        self.pending = {key for key, _ in items}
        self.compiled = self.failed = 0
        self.t0 = self.last = time.time()
        self.first_s: float | None = None  # when the first candidate was reported
        self.on_gpu: set[str] = set()  # candidates compiled from GPU inputs (CPU ones failed)
        self.procs: list[Any] = []
        ctx = mp.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        for item in items:
            self.tasks.put(item)
        n = min(workers, len(items))
        for _ in range(n):
            self.tasks.put(None)
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [visible_device(g) for g in (gpus or [0])]
        try:
            for i in range(n):
                os.environ["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]  # at spawn
                p = ctx.Process(target=_compile_loop, daemon=True,
                                args=(problem, fp8_dtype, self.tasks, self.results))  # fmt: skip
                p.start()
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
        while True:
            try:
                kind, key, where = self.results.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            self.pending.discard(key)
            self.last = time.time()
            if self.first_s is None:
                self.first_s = self.last - self.t0
            if where == "cuda":
                self.on_gpu.add(key)
            if kind == "compiled":
                self.compiled += 1
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
        how = f", {len(self.on_gpu)} from GPU inputs" if self.on_gpu else ""
        return f"first after {self.first_s:.1f} s, last after {self.last - self.t0:.1f} s{how}"

    def wait(self) -> None:
        """Block until every candidate is reported (for backends that cannot wait per chunk)."""
        while self.pending:
            self.poll()
            time.sleep(0.1)

    def close(self) -> None:
        # Tasks never read stay in the queue's pipe; without this the interpreter would wait at
        # exit for a feeder thread blocked on a full pipe.
        self.tasks.cancel_join_thread()
        self.results.cancel_join_thread()
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.procs = []
