"""Evaluating one candidate at one batch size: check against the reference, then time.

Used in the sweep's own process (interpreter, tests) and in its worker processes (GPUs), so it
never raises for a bad candidate: every outcome is a journal record. Faults can be injected here
through ``moetune.faults`` (a test-only hook) without touching the kernel.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moetune import faults
from moetune.check import check_op
from moetune.gemms import FINAL_PREFIX, gemm_configs
from moetune.inputs import random_moe_inputs, timing_input_sets
from moetune.ops import fused_experts
from moetune.platform import Platform
from moetune.problem import Problem
from moetune.reference import Reference
from moetune.timing import time_op

# A CUDA error of this kind leaves the context unusable: the worker must be replaced.
FATAL_CUDA_MARKERS = ("illegal memory access", "unspecified launch failure", "CUDA error")


def is_fatal(record: dict[str, Any]) -> bool:
    """Whether an evaluation (or a finalist's re-check after it) left the CUDA context unusable:
    the worker or actor that ran it must be replaced before it takes more work."""
    recheck = record.get("recheck") or {}
    reason = f"{record.get('reason', '')} {recheck.get('reason', '')}"
    broken = record.get("status") == "failed" or not recheck.get("ok", True)
    return broken and any(m in reason for m in FATAL_CUDA_MARKERS)


# A winner's re-check draws fresh inputs with seed RECHECK_SEED + M (not the check's or timing's).
RECHECK_SEED = 1000


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    name = type(e).__name__
    if "OutOfResources" in name or "out of resource" in str(e):
        return f"out of resources: {msg}"
    return f"{name}: {msg}"[:300]


class Workload:
    """Inputs for every batch size, built once: a check set and rotating timing sets (nothing
    with ``timing=False``, for re-checks only); re-checks draw their own fresh inputs.

    Each set is drawn at the largest batch size and sliced, so weights are shared across batch
    sizes (a sweep of a large model holds a few weight copies, not one per batch size).
    """

    def __init__(
        self, problem: Problem, platform: Platform, batch_sizes: list[int], device: str,
        skew: str = "uniform", act_scales: str = "dynamic", *, timing: bool = True,
    ):  # fmt: skip
        self.problem, self.device, self.skew = problem, device, skew
        self.static = act_scales == "static"  # w8a8: calibrated static activation scales
        self.fp8 = getattr(torch, platform.fp8_dtype)
        self.refs: dict[int, Reference] = {}
        self.sets: list[tuple[tuple, dict]] = []
        self.num_sets = 0
        if not timing:  # re-checks only: they draw their own inputs
            return
        self.sets = timing_input_sets(problem, max(batch_sizes), device, fp8_dtype=self.fp8,
                                      skew=skew, static_scales=self.static)  # fmt: skip
        self.check, self.num_sets = self.sets[0], len(self.sets)

    def _draw(self, M: int, seed: int) -> tuple[tuple, dict]:
        return random_moe_inputs(self.problem, M, self.device, seed=seed, fp8_dtype=self.fp8,
                                 skew=self.skew, static_scales=self.static)  # fmt: skip

    @staticmethod
    def slice(inputs: tuple[tuple, dict], M: int) -> tuple[tuple, dict]:
        (x, w1, w2, tw, ti), kw = inputs
        return (x[:M], w1, w2, tw[:M], ti[:M]), kw

    def reference(self, M: int) -> Reference:
        if M not in self.refs:
            args, kw = self.slice(self.check, M)
            self.refs[M] = Reference(*args, **kw)
        return self.refs[M]


def evaluate(
    workload: Workload, config: dict[str, Any], M: int, *, replays: int, key: str = ""
) -> dict[str, Any]:
    """Check then time one config at one batch size; never raises for a bad candidate.

    A split sweep's key (``up:…``/``down:…``) puts ``config`` on that GEMM only and the
    heuristic default on the other (:func:`moetune.gemms.gemm_configs`). A finalist's key
    (``final:…``) that passes also gets ``recheck``: the check on fresh inputs its win depends
    on, done wherever the finalist ran (a GPU worker, a Ray actor, or in-process). ``eval_s``
    in the result is the wall time this pair cost on its worker (compile included when it was
    not cached), which is what a budgeted search's time curve adds up."""
    t0 = time.perf_counter()
    record = _evaluate(workload, config, M, replays=replays, key=key)
    record["eval_s"] = round(time.perf_counter() - t0, 4)
    if workload.static:  # says which inputs the pair ran on, wherever it ran
        record["act_scales"] = "static"
    return record


def _evaluate(
    workload: Workload, config: dict[str, Any], M: int, *, replays: int, key: str
) -> dict[str, Any]:
    problem = workload.problem
    try:
        faults.before_run(key)
        up, down = gemm_configs(problem, key, config, M)
        args, kw = workload.slice(workload.check, M)

        def first() -> torch.Tensor:
            out = fused_experts(*args, config=up, config_down=down, **kw)
            faults.corrupt_output(key, out)
            return out

        result = check_op(
            first, workload.reference(M), dtype=problem.torch_dtype, quant=problem.quant
        )
        if not result.ok:
            return {"status": "rejected", "reason": f"check failed: {result.reason}",
                    "check": result.as_dict()}  # fmt: skip
        # A finalist's re-check comes before its timing, so every finalist is timed in the same
        # state. Timed first, the first finalist of gpt-oss-120b's first batch size read as
        # itself in the first pass and the ones after it (each timed after the re-check before
        # it, which draws and frees GBs of fresh weights) 11-17% slower than in the first pass,
        # on an H100 (results/tables/h100-0.2.11-decode-retune/README.md).
        again = None
        if key.startswith(FINAL_PREFIX):
            again = recheck(problem, workload, up, M, RECHECK_SEED + M, down)
        sliced = [workload.slice(s, M) for s in workload.sets]

        def run(i: int) -> object:
            a, k = sliced[i]
            return fused_experts(*a, config=up, config_down=down, **k)

        timing = time_op(run, len(sliced), device=workload.device, replays=replays)
        record = {"status": "ok", "timing": timing.as_dict(), "check": result.as_dict()}
        if again is not None:
            record["recheck"] = again
        return record
    except Exception as e:  # compile errors, out of resources, launch failures
        if workload.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"status": "failed", "reason": _first_line(e)}


def recheck(
    problem: Problem, workload: Workload, config: dict, M: int, seed: int,
    config_down: dict | None = None,
) -> dict:  # fmt: skip
    """A winner's check on fresh inputs (new weights, tokens and routing); ``config_down``
    (default: ``config``) runs the down GEMM."""
    fresh = workload.slice(workload._draw(M, seed=seed), M)
    try:
        result = check_op(
            lambda: fused_experts(*fresh[0], config=config, config_down=config_down, **fresh[1]),
            Reference(*fresh[0], **fresh[1]), dtype=problem.torch_dtype, quant=problem.quant,
        )  # fmt: skip
        return result.as_dict()
    except Exception as e:
        return {"ok": False, "reason": _first_line(e)}
