"""Compile a sweep's candidates in parallel worker processes before the sweep times them.

Triton keeps compiled kernels in its on-disk cache, keyed by the source, the constexprs and the
specialization of the integer arguments (divisibility by 16). Workers run the op once per
candidate on a small problem with the sweep's N, K and strides, so the sweep process later loads
each kernel from the cache instead of compiling ~300 candidates one after another. A candidate
that fails to compile here is simply left for the sweep to record with its reason.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os

from moetune.problem import Problem


def _compile_some(problem: Problem, configs: list[dict], fp8_dtype: str) -> int:
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
    return compiled


def precompile(problem: Problem, configs: list[dict], fp8_dtype: str, workers: int) -> int:
    """Compile ``configs`` for ``problem`` in ``workers`` processes; returns how many compiled."""
    if workers <= 1 or not configs:
        return 0
    chunks = [configs[i::workers] for i in range(workers)]
    ctx = mp.get_context("spawn")
    env_backup = os.environ.get("CUDA_MODULE_LOADING")
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_compile_some, problem, c, fp8_dtype) for c in chunks if c]
            return sum(f.result() for f in futures)
    except Exception:  # a broken pool only costs speed: the sweep compiles what is missing
        return 0
    finally:
        if env_backup is None:
            os.environ.pop("CUDA_MODULE_LOADING", None)
