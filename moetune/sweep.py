"""`moetune sweep`: check every candidate against the reference, time those that pass.

A candidate's path (DESIGN §4): pruned before compiling → compiled once (the kernel does not
specialize on the batch size) → checked at each batch size on random inputs with a NaN-poisoned
workspace, against a reference computed once per batch size → timed as the whole op by CUDA-graph
replay over rotating input sets → one journal line per (candidate, batch size). A candidate that
fails anywhere is recorded with its reason; the sweep goes on. The fastest candidates per batch
size are timed again more carefully, then re-checked on fresh inputs before they count.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moetune.check import check_close
from moetune.defaults import default_config
from moetune.inputs import random_moe_inputs
from moetune.journal import Journal, open_journal, provenance
from moetune.ops import fused_experts, poisoned_workspace
from moetune.platform import Platform
from moetune.precompile import precompile
from moetune.problem import Problem
from moetune.space import Candidate, prune_reason, space_id
from moetune.timing import l2_bytes, rotation_count, time_op

Progress = Callable[[int, int, str], None]  # (done, total, message)
FINALISTS = 4  # candidates per batch size timed again with more replays


@dataclass
class BatchResult:
    M: int
    best: dict[str, Any] | None  # winner record
    default_us: float | None
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.best is None or not self.default_us:
            return None
        return self.default_us / self.best["timing"]["median_us"]


@dataclass
class SweepResult:
    journal: Path
    batches: list[BatchResult]
    interpreter: bool
    wall_s: float


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    name = type(e).__name__
    if "OutOfResources" in name or "out of resource" in str(e):
        return f"out of resources: {msg}"
    return f"{name}: {msg}"[:300]


class _Workload:
    """Inputs for every batch size, built once: rotating timing sets, a check set, a recheck set.

    Each set is drawn at the largest batch size and sliced, so weights are shared across batch
    sizes (a sweep of a large model holds a few weight copies, not one per batch size).
    """

    def __init__(self, problem: Problem, platform: Platform, batch_sizes: list[int], device: str):
        self.problem, self.device = problem, device
        self.fp8 = getattr(torch, platform.fp8_dtype)
        m_max = max(batch_sizes)
        self.check = self._draw(m_max, seed=1)
        w_bytes = sum(t.numel() * t.element_size() for t in self.check[0][1:3])
        self.num_sets = rotation_count(w_bytes, l2_bytes(device))
        self.sets = [self.check] + [self._draw(m_max, seed=2 + i) for i in range(self.num_sets - 1)]
        self.refs: dict[int, torch.Tensor] = {}

    def _draw(self, M: int, seed: int) -> tuple[tuple, dict]:
        return random_moe_inputs(self.problem, M, self.device, seed=seed, fp8_dtype=self.fp8)

    @staticmethod
    def slice(inputs: tuple[tuple, dict], M: int) -> tuple[tuple, dict]:
        (x, w1, w2, tw, ti), kw = inputs
        return (x[:M], w1, w2, tw[:M], ti[:M]), kw

    def reference(self, M: int) -> torch.Tensor:
        if M not in self.refs:
            from moetune.reference import fused_experts_reference

            args, kw = self.slice(self.check, M)
            self.refs[M] = fused_experts_reference(*args, **kw)
        return self.refs[M]


def evaluate(
    workload: _Workload, config: dict[str, Any], M: int, *, replays: int
) -> dict[str, Any]:
    """Check then time one config at one batch size; never raises for a bad candidate."""
    problem = workload.problem
    try:
        args, kw = workload.slice(workload.check, M)
        with poisoned_workspace():
            out = fused_experts(*args, config=config, **kw)
        result = check_close(
            out, workload.reference(M), dtype=problem.torch_dtype, quant=problem.quant
        )
        if not result.ok:
            return {"status": "rejected", "reason": f"check failed: {result.reason}",
                    "check": result.as_dict()}  # fmt: skip
        sliced = [workload.slice(s, M) for s in workload.sets]

        def run(i: int) -> object:
            a, k = sliced[i]
            return fused_experts(*a, config=config, **k)

        timing = time_op(run, len(sliced), device=workload.device, replays=replays)
        return {"status": "ok", "timing": timing.as_dict(), "check": result.as_dict()}
    except Exception as e:  # compile errors, out of resources, launch failures
        if workload.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"status": "failed", "reason": _first_line(e)}


def recheck(problem: Problem, workload: _Workload, config: dict, M: int, seed: int) -> dict:
    """A winner's check on fresh inputs (new weights, tokens and routing)."""
    from moetune.reference import fused_experts_reference

    fresh = workload.slice(workload._draw(M, seed=seed), M)
    try:
        with poisoned_workspace():
            out = fused_experts(*fresh[0], config=config, **fresh[1])
        ref = fused_experts_reference(*fresh[0], **fresh[1])
        return check_close(out, ref, dtype=problem.torch_dtype, quant=problem.quant).as_dict()
    except Exception as e:
        return {"ok": False, "reason": _first_line(e)}


def problem_dict(problem: Problem) -> dict[str, Any]:
    d = dataclasses.asdict(problem)
    d["block_shape"] = list(problem.block_shape) if problem.block_shape else None
    return d


def run_sweep(
    problem: Problem,
    platform: Platform,
    candidates: list[Candidate],
    *,
    batch_sizes: list[int],
    journal_path: Path,
    space_name: str,
    fresh: bool = False,
    replays: int = 5,
    progress: Progress | None = None,
    compile_workers: int = 0,
) -> SweepResult:
    """Sweep ``candidates`` over ``batch_sizes``; resumable from ``journal_path``."""
    t0 = time.time()
    device = "cpu" if platform.is_interpreter else "cuda"
    header = {
        "problem": problem_dict(problem),
        "space": space_name,
        "space_id": space_id(candidates),
        "batch_sizes": batch_sizes,
        "platform": platform.key,
        **provenance(platform.device_name, platform.is_interpreter),
    }
    journal = open_journal(journal_path, header, fresh=fresh)
    try:
        _sweep_all(
            problem,
            platform,
            candidates,
            batch_sizes,
            journal,
            device,
            replays,
            progress,
            compile_workers,
        )
        batches = _finish(problem, platform, journal, batch_sizes, device, progress)
    finally:
        journal.close()
    return SweepResult(journal.path, batches, platform.is_interpreter, time.time() - t0)


def _sweep_all(problem, platform, candidates, batch_sizes, journal: Journal, device, replays,
               progress, compile_workers) -> None:  # fmt: skip
    done = journal.done()
    if device == "cuda" and compile_workers > 1:
        todo = [c.as_config() for c in candidates
                if any((c.key(), M) not in done for M in batch_sizes)]  # fmt: skip
        if progress:
            progress(0, 0, f"compiling {len(todo)} candidates in {compile_workers} processes")
        t_compile = time.time()
        n = precompile(problem, todo, platform.fp8_dtype, compile_workers)
        if progress:
            progress(0, 0, f"compiled {n} of {len(todo)} in {time.time() - t_compile:.0f} s")
    workload = _Workload(problem, platform, batch_sizes, device)
    pairs = [(c, M) for c in candidates for M in batch_sizes] + [(None, M) for M in batch_sizes]
    total = len(pairs)
    for i, (cand, M) in enumerate(pairs):
        key = cand.key() if cand else "default"
        if (key, M) in done:
            continue
        if cand is None:
            config = default_config(M, problem.E, problem.N, problem.K, problem.topk,
                                    dtype=problem.torch_dtype, quant=problem.quant,
                                    block_shape=problem.block_shape)  # fmt: skip
            reason = None
        else:
            config = cand.as_config()
            reason = prune_reason(cand, platform, problem, M)
        record: dict[str, Any] = {"candidate": key, "M": M, "config": config,
                                  "t": round(time.time(), 2)}  # fmt: skip
        if reason is not None:
            record.update(status="pruned", reason=reason)
        else:
            record.update(evaluate(workload, config, M, replays=replays))
        journal.append(record)
        if progress:
            progress(i + 1, total, f"M={M} {key}: {record['status']}")


def _finish(
    problem, platform, journal: Journal, batch_sizes, device, progress
) -> list[BatchResult]:
    """Per batch size: re-time the finalists, re-check them on fresh inputs, record the winner."""
    workload = None
    winners = {r["M"]: r for r in journal.records if r.get("kind") == "winner"}
    results = []
    for M in batch_sizes:
        recs = [r for r in journal.records if r.get("M") == M and "candidate" in r]
        counts: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for r in recs:
            if r["candidate"] == "default":
                continue
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            if r["status"] in ("rejected", "failed"):
                short = r["reason"].split(":")[0]
                reasons[short] = reasons.get(short, 0) + 1
        default = next((r for r in recs if r["candidate"] == "default" and r["status"] == "ok"),
                       None)  # fmt: skip
        default_us = default["timing"]["median_us"] if default else None
        if M not in winners:
            if workload is None:
                workload = _Workload(problem, platform, batch_sizes, device)
            winners[M] = _pick_winner(problem, workload, recs, M, journal, progress)
        if winners[M] is not None and default is not None and winners[M].get("default_us") is None:
            winners[M]["default_us"] = default_us
        results.append(BatchResult(M, winners[M], default_us, counts, reasons))
    return results


def _pick_winner(problem, workload, recs, M, journal: Journal, progress) -> dict | None:
    ok = [r for r in recs if r["status"] == "ok" and r["candidate"] != "default"]
    ok.sort(key=lambda r: r["timing"]["median_us"])
    finalists = []
    for r in ok[:FINALISTS]:
        again = evaluate(workload, r["config"], M, replays=40)
        if again["status"] == "ok":
            finalists.append((again["timing"]["median_us"], r, again))
    finalists.sort(key=lambda t: t[0])
    for n, (_, r, again) in enumerate(finalists):
        check = recheck(problem, workload, r["config"], M, seed=1000 + M)
        if progress:
            progress(
                0, 0, f"M={M} winner {r['candidate']}: recheck {'ok' if check['ok'] else 'FAILED'}"
            )
        if check["ok"]:
            winner = {"kind": "winner", "M": M, "winner": r["candidate"], "config": r["config"],
                      "timing": again["timing"], "recheck": check, "rank": n}  # fmt: skip
            journal.append(winner)
            return winner
        journal.append({"kind": "recheck-failed", "M": M, "failed": r["candidate"],
                        "recheck": check})  # fmt: skip
    return None


def timings_note(interpreter: bool) -> str:
    if interpreter:
        return ("Interpreter run on CPU: timings are Triton-interpreter timings, "
                "not GPU timings; use them only to see the sweep work end to end.")  # fmt: skip
    return "GPU timings: whole op (both GEMMs + activation), CUDA-graph replay, median."


def fmt_us(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.1f}" if v < 1e4 else f"{v:,.0f}"
