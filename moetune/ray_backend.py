"""Running a sweep's work on Ray actors (``--backend ray``; the optional ``moetune[ray]`` extra).

One actor per GPU (``num_gpus=1``) builds the inputs once and evaluates one (candidate, batch
size) pair per call, so a crash or a hang is charged to exactly one pair. Results stream back to
the driver, which alone writes the journal: resume works as with local workers. A dead actor
(crash, lost node) is recorded as a failure of its pair and replaced; a pair past the timeout
gets its actor killed and replaced. Ray's own scheduling places actors across the cluster.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from moetune.accum import FP8_ACCUM_ENV
from moetune.faults import FAULTS_ENV

_FORWARDED_ENV = ("TRITON_INTERPRET", FAULTS_ENV, FP8_ACCUM_ENV)


class _PairWorker:
    def __init__(self, problem_d: dict, platform_key: str, device: str,
                 batch_sizes: list[int], skew: str, act_scales: str) -> None:  # fmt: skip
        from moetune.evaluate import Workload
        from moetune.platform import get_platform
        from moetune.problem import Problem

        bs = problem_d.get("block_shape")
        problem = Problem(**{**problem_d, "block_shape": tuple(bs) if bs else None})
        self.workload = Workload(problem, get_platform(platform_key), batch_sizes, device, skew,
                                 act_scales)  # fmt: skip

    def run(self, key: str, config: dict, M: int, replays: int) -> dict:
        from moetune.evaluate import evaluate, is_fatal

        rec = evaluate(self.workload, config, M, replays=replays, key=key)
        if is_fatal(rec):  # a finalist's re-check too: it runs after the timing
            rec["fatal"] = True  # the driver replaces this actor
        return rec


def run_on_ray(problem, platform, device, batch_sizes, work, execution, on_record) -> None:
    """Evaluate ``work`` [(key, config, M, replays)] on Ray actors; ``on_record`` per result."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--backend ray needs Ray: pip install 'moetune[ray]'") from None
    from moetune.sweep import problem_dict

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if not ray.is_initialized():
        ray.init(address=execution.ray_address, include_dashboard=False,
                 runtime_env={"env_vars": env}, logging_level="ERROR")  # fmt: skip
    gpu = device == "cuda"
    n = len(execution.gpus) if execution.gpus else (
        int(ray.cluster_resources().get("GPU", 0)) if gpu else 1
    )  # fmt: skip
    if n < 1:
        raise RuntimeError("the Ray cluster has no GPU")
    actor_cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_restarts=0)(_PairWorker)
    args = (problem_dict(problem), platform.key, device, batch_sizes, execution.skew,
            execution.act_scales)  # fmt: skip
    actors = [actor_cls.remote(*args) for _ in range(n)]
    todo = deque(work)
    running: dict[Any, tuple[int, tuple, float]] = {}  # ref -> (actor index, pair, start)

    def submit(i: int) -> None:
        if todo:
            pair = todo.popleft()
            running[actors[i].run.remote(*pair)] = (i, pair, time.time())

    for i in range(n):
        submit(i)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                i, (key, config, M, _), _ = running.pop(ref)
                base = {"candidate": key, "M": M, "config": config, "worker": f"ray-{i}"}
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    rec = {"status": "failed", "reason": f"worker crashed: {type(e).__name__}"}
                    actors[i] = actor_cls.remote(*args)
                if rec.pop("fatal", False):
                    ray.kill(actors[i])
                    actors[i] = actor_cls.remote(*args)
                on_record({**base, **rec})
                submit(i)
            now = time.time()
            for ref, (i, (key, config, M, _), start) in list(running.items()):
                if now - start > execution.timeout_s:
                    running.pop(ref)
                    ray.kill(actors[i])
                    actors[i] = actor_cls.remote(*args)
                    on_record({"candidate": key, "M": M, "config": config, "worker": f"ray-{i}",
                               "status": "failed",
                               "reason": f"timeout: no result after {execution.timeout_s:.0f} s; "
                                         "worker killed"})  # fmt: skip
                    submit(i)
    finally:
        for a in actors:
            ray.kill(a)
