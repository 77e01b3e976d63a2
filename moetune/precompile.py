"""Compile a sweep's candidates in parallel worker processes before the sweep times them.

Triton keeps compiled kernels in its on-disk cache, keyed by the source, the constexprs and the
specialization of the integer arguments (divisibility by 16). Workers run the op once per
candidate on a small problem with the sweep's N, K and strides, so the sweep process later loads
each kernel from the cache instead of compiling ~300 candidates one after another. A candidate
that fails to compile here is simply left for the sweep to record with its reason.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time

from moetune.problem import Problem
from moetune.workers import visible_device

COMPILE_DEADLINE_S = 1800


def _compile_some(problem: Problem, configs: list[dict], fp8_dtype: str, results) -> None:
    import torch

    from moetune.inputs import random_moe_inputs
    from moetune.ops import fused_experts

    # Only topk experts: expert count is not a kernel argument, the weight strides stay the same.
    small = dataclasses.replace(problem, E=problem.topk)
    args, kw = random_moe_inputs(small, 16, "cuda", seed=0, fp8_dtype=getattr(torch, fp8_dtype))
    compiled = 0
    for config in configs:
        try:
            fused_experts(*args, config=config, **kw)
            compiled += 1
        except Exception:  # recorded later by the sweep, with its reason
            torch.cuda.synchronize()
    results.put(compiled)


def precompile(
    problem: Problem,
    configs: list[dict],
    fp8_dtype: str,
    workers: int,
    gpus: list[int] | None = None,
) -> int:
    """Compile ``configs`` in ``workers`` processes spread over ``gpus``; returns how many
    compiled (0 if the processes could not run: the sweep then compiles what is missing)."""
    if workers <= 1 or not configs:
        return 0
    gpus = gpus or [0]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [visible_device(g) for g in gpus]
    try:
        for i in range(min(workers, len(configs))):
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]  # inherited at spawn
            p = ctx.Process(target=_compile_some, daemon=True,
                            args=(problem, configs[i::workers], fp8_dtype, results))  # fmt: skip
            p.start()
            procs.append(p)
    except OSError:  # no processes to be had: the sweep compiles as it goes
        for p in procs:
            p.kill()
        return 0
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    compiled = 0
    deadline = time.time() + COMPILE_DEADLINE_S
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.time()))
        if p.is_alive():  # a compile that hangs is left for the sweep's per-pair timeout
            p.kill()
            p.join()
    while not results.empty():
        compiled += results.get()
    return compiled
