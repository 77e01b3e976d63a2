"""`moetune sweep`: check every candidate against the reference, time those that pass.

A candidate's path (DESIGN §4): pruned before compiling → compiled once (the kernel does not
specialize on the batch size) → checked at each batch size on random inputs with a NaN-poisoned
workspace, against a reference computed once per batch size → timed as the whole op by CUDA-graph
replay over rotating input sets → one journal line per (candidate, batch size). A candidate that
fails anywhere is recorded with its reason; the sweep goes on. The fastest candidates per batch
size are timed again more carefully, then re-checked on fresh inputs before they count.

``Execution.gemms="split"`` tunes the two GEMMs apart (:mod:`moetune.gemms`): every candidate
runs once per GEMM, the finalists and winners are chosen per GEMM, and a down winner counts only
when it also passes a check together with that batch size's up winner. The two winners are then
timed together, beside the up winner on both GEMMs and the incumbent on both, and the fastest
pair is what counts (:mod:`moetune.pairs`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.accum import fp8_accum_mode
from moetune.evaluate import RECHECK_SEED, Workload, recheck
from moetune.gemms import (
    FINAL_PREFIX,
    GEMMS,
    committed,
    counts,
    gemm_configs,
    gemm_of,
    heuristic,
    split_key,
)
from moetune.halving import (
    FINAL_COST,
    anchors,
    incumbent_pairs,
    ranked_ok,
    survivors,
    survivors_within,
)
from moetune.journal import Journal, open_journal, provenance, resumed_settings
from moetune.pairs import decided, pair_time, settle
from moetune.pairs import options as pair_options
from moetune.platform import Platform
from moetune.precompile import Compiler
from moetune.problem import Problem
from moetune.procs import forking
from moetune.runner import Runner
from moetune.space import Candidate, prune_reason, space_id

Progress = Callable[[int, int, str], None]  # (done, total, message)
FINALISTS = 4  # candidates per batch size timed again with more replays
FINAL_REPLAYS = 40


ACT_SCALES = ("static", "dynamic")


@dataclass(frozen=True)
class Execution:
    """Where the work runs. ``isolate`` puts it in worker processes (one per GPU in ``gpus``, or
    one CPU worker); ``backend="ray"`` hands it to Ray actors instead."""

    isolate: bool = False
    gpus: list[int] | None = None
    timeout_s: float = 600.0
    # Pairs per chunk, at most; a chunk never spans two candidates. 18 (a candidate's batch
    # sizes on one worker, its kernels loaded once) was no faster on 4x H100: 162.1 s with 18,
    # 159.4 s with 6 (results/full-space-0.3/NOTES.md).
    chunk_size: int = 6
    backend: str = "local"
    ray_address: str | None = None
    skew: str = "uniform"  # routing of the random inputs (moetune.inputs.SKEWS)
    # "static": w8a8 activations quantized with calibrated per-tensor scales, as vLLM's tuner and
    # checkpoints with static scales run; "dynamic": computed per call (ACT_SCALES).
    act_scales: str = "dynamic"
    # "exhaustive": every candidate at every batch size. "halving": every candidate at three
    # anchor batch sizes, then only the fastest ``keep`` fraction at the others.
    strategy: str = "exhaustive"
    keep: float = 0.25
    budget_s: float | None = None  # halving: keep as many as fit this wall time (moetune.halving)
    gemms: str = "joint"  # "split": tune the up and down GEMMs apart (moetune.gemms)
    # split: keep the main table's entry, which vLLM runs on both GEMMs, within
    # moetune.pairs.VLLM_MARGIN of the incumbent's time (moetune.pairs).
    vllm_safe: bool = True


@dataclass
class BatchResult:
    M: int
    best: dict[str, Any] | None  # winner record (the up GEMM's in a split sweep)
    default_us: float | None
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    best_down: dict[str, Any] | None = None  # the down GEMM's winner record (split sweeps)
    # Split sweeps: the two winners timed together (moetune.pairs); each winner's own time was
    # taken with the other GEMM at the heuristic default.
    pair_us: float | None = None

    @property
    def time_us(self) -> float | None:
        """What the table's entries take: the winner's time; in a split sweep with a down
        winner, the two timed together (None where they were not)."""
        if self.best_down is not None:
            return self.pair_us
        return self.best["timing"]["median_us"] if self.best is not None else None

    @property
    def speedup(self) -> float | None:
        if self.time_us is None or not self.default_us:
            return None
        return self.default_us / self.time_us


@dataclass
class SweepResult:
    journal: Path
    batches: list[BatchResult]
    interpreter: bool
    wall_s: float


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
    execution: Execution | None = None,
    incumbent: dict[int, dict[str, Any]] | None = None,
) -> SweepResult:
    """Sweep ``candidates`` over ``batch_sizes``; resumable from ``journal_path``.

    ``incumbent`` maps batch sizes to the configs the runtime uses there today (the table a
    re-tune would replace): under halving, each one that is a candidate is timed at its batch
    size even when it did not go past the anchors (:func:`moetune.halving.incumbent_pairs`)."""
    t0 = time.time()
    device = "cpu" if platform.is_interpreter else "cuda"
    execution = execution or Execution()
    if execution.act_scales not in ACT_SCALES:
        raise ValueError(f"act_scales must be one of {ACT_SCALES}, got {execution.act_scales!r}")
    if execution.act_scales == "static" and not problem.takes_static_scales:
        raise ValueError("static activation scales are for per-tensor fp8_w8a8 and int8_w8a8")
    header = {
        "problem": problem_dict(problem),
        "space": space_name,
        "space_id": space_id(candidates),
        "batch_sizes": batch_sizes,
        "platform": platform.key,
        "skew": execution.skew,
        "act_scales": execution.act_scales,
        "strategy": execution.strategy,
        "gemms": execution.gemms,
        # fp8 accumulation changes fp8 results and timings only, so only fp8 sweeps record it.
        "fp8_accum": fp8_accum_mode() if problem.quant == "fp8_w8a8" else None,
        **provenance(platform.device_name, platform.is_interpreter),
    }
    journal = open_journal(journal_path, header, fresh=fresh)
    changed = resumed_settings(journal, header)
    if changed:  # resumed with other batch sizes or strategy: the journal says so
        journal.append({"kind": "resumed", **changed, "t": round(time.time(), 2)})
    for warning in journal.warnings:
        if progress:
            progress(0, 0, f"warning: {warning}")
    runner = Runner(problem, platform, device, batch_sizes, execution)
    try:
        _sweep_all(problem, platform, candidates, batch_sizes, journal, replays, progress,
                   compile_workers, runner, incumbent or {})  # fmt: skip
        if progress:
            progress(0, 0, f"first pass done after {time.time() - t0:.1f} s")
        _time_finalists(journal, batch_sizes, execution, progress, runner, incumbent or {})
        runner.close()
        if progress:
            progress(0, 0, f"finalists done, workers stopped after {time.time() - t0:.1f} s")
        batches = _finish(problem, platform, journal, batch_sizes, device, progress,
                          execution, runner, incumbent or {})  # fmt: skip
    finally:
        runner.close()
        journal.close()
    return SweepResult(journal.path, batches, platform.is_interpreter, time.time() - t0)


def _sweep_all(problem, platform, candidates, batch_sizes, journal: Journal, replays,
               progress, compile_workers, runner: Runner,
               incumbent: dict[int, dict[str, Any]]) -> None:  # fmt: skip
    keyed = _keyed(candidates, runner.execution.gemms)
    compiler = None
    if runner.device == "cuda" and compile_workers > 0:
        pending = compile_keys(journal, keyed, batch_sizes, runner.execution, incumbent)
        todo = [(c.key(), c.as_config()) for c in candidates if c.key() in pending]
        if todo:
            runner.start()  # the workers get ready while the first candidates compile
            if progress:
                progress(0, 0, f"compiling {len(todo)} candidates in {compile_workers} "
                               "processes, evaluating each as it is ready")  # fmt: skip
            compiler = Compiler(problem, todo, platform.fp8_dtype, compile_workers,
                                runner.execution.gpus, platform.cuda_capability(),
                                runner.execution.act_scales, max(batch_sizes))  # fmt: skip
    runner.compiler = compiler
    try:
        _sweep_pairs(problem, platform, keyed, batch_sizes, journal, replays, progress, runner,
                     incumbent)  # fmt: skip
    finally:
        runner.compiler = None
        if progress and runner.pool is not None and runner.pool.ready_after:
            progress(0, 0, runner.pool.startup_note(forking()))
        if compiler is not None:
            compiler.close()
            if progress:
                progress(0, 0, f"compiled {compiler.compiled} candidates ahead "
                               f"({compiler.failed} failed to compile): "
                               f"{compiler.timeline()}")  # fmt: skip


def compile_keys(
    journal: Journal,
    keyed: list[tuple[str, Candidate]],
    batch_sizes: list[int],
    execution: Execution,
    incumbent: dict[int, dict[str, Any]],
) -> set[str]:
    """The candidates (``Candidate.key()``) with a first-pass pair still to run: what to
    compile ahead. A halving sweep resumed after its anchor round has only the survivors (and
    the incumbent's entries) left to run, so only those are compiled, not the whole space again
    (1,696 candidates took 310-340 s on 16 processes of an H100 host). Under ``--budget`` the
    survivors are known only once journaled; before that, every candidate with a pair left."""
    done = journal.done()
    at = anchors(batch_sizes)
    rest = [M for M in batch_sizes if M not in at]
    if (execution.strategy == "halving" and rest
            and all((k, M) in done for k, _ in keyed for M in at)):  # fmt: skip
        if execution.budget_s is None:
            keep = survivors(journal, keyed, at, execution.keep)
        else:
            keep = _journaled_survivors(journal, keyed)
        if keep is not None:
            pairs = [(k, c, M) for k, c in keep for M in rest]
            pairs += incumbent_pairs(keyed, incumbent, rest, {k for k, _ in keep})
            return {c.key() for k, c, M in pairs if (k, M) not in done}
    return {c.key() for k, c in keyed if any((k, M) not in done for M in batch_sizes)}


def _sweep_pairs(problem, platform, keyed, batch_sizes, journal: Journal, replays, progress,
                 runner: Runner, incumbent: dict[int, dict[str, Any]]) -> None:  # fmt: skip
    execution = runner.execution
    if execution.strategy == "halving" and len(batch_sizes) > len(anchors(batch_sizes)):
        at = anchors(batch_sizes)
        _run_pairs(problem, platform, journal, replays, progress, runner,
                   [(k, c, M) for k, c in keyed for M in at])  # fmt: skip
        rest = [M for M in batch_sizes if M not in at]
        if execution.budget_s is not None:
            held = sum(M in incumbent for M in batch_sizes) if execution.gemms != "split" else 0
            keep, how = _budgeted(journal, keyed, at, rest, batch_sizes, runner, held)
        else:
            keep, how = survivors(journal, keyed, at, execution.keep), ""
        extra = incumbent_pairs(keyed, incumbent, rest, {k for k, _ in keep})
        if extra:
            how += (f", and the incumbent table's entry at {len({M for *_, M in extra})} of "
                    "them where it did not go on")  # fmt: skip
        if progress:
            progress(0, 0, f"halving: {len(keep)} of {len(keyed)} candidates go on to "
                           f"the other {len(rest)} batch sizes{how}")  # fmt: skip
        pairs = [(k, c, M) for k, c in keep for M in rest] + extra
    else:
        if execution.strategy == "halving" and progress:
            progress(0, 0, f"halving: the {len(batch_sizes)} batch sizes are all anchors; every "
                           "candidate runs at each")  # fmt: skip
        pairs = [(k, c, M) for k, c in keyed for M in batch_sizes]
    pairs += [("default", None, M) for M in batch_sizes]
    _run_pairs(problem, platform, journal, replays, progress, runner, pairs)


def _budgeted(journal: Journal, keyed, at: list[int], rest: list[int], batch_sizes,
              runner: Runner, held: int = 0) -> tuple[list, str]:  # fmt: skip
    """Halving's survivors under --budget. The choice depends on the time it was made at, so it
    is journaled: a resumed or repeated run goes on with the same candidates instead of a new
    choice from a fresh clock."""
    keep = _journaled_survivors(journal, keyed)
    if keep is not None:
        return keep, " (--budget: as chosen before)"
    ex = runner.execution
    # Finalists, the default's first pass, and in a joint sweep its re-timing where it joins
    # them (finalists()).
    finals = FINALISTS * len(_roles(ex.gemms)) + (ex.gemms == "joint")
    fixed = finals * len(batch_sizes) * FINAL_COST + len(batch_sizes)
    fixed += held * FINAL_COST  # incumbent entries that may rank below the finalists
    if ex.gemms == "split":  # the winners timed together: up to three pairs per batch size
        fixed += 3 * len(batch_sizes) * FINAL_COST
    spent = time.time() - runner.t0
    keep, how = survivors_within(journal, keyed, at, len(rest), ex.budget_s, spent,
                                 runner.parallel, fixed, ex.keep)  # fmt: skip
    journal.append({"kind": "survivors", "keys": [k for k, _ in keep], "budget_s": ex.budget_s,
                    "t": round(time.time(), 2)})  # fmt: skip
    return keep, how


def _journaled_survivors(journal: Journal, keyed: list) -> list | None:
    """The keyed candidates of the last survivors choice journaled under --budget; None when
    none was made yet."""
    made = [r for r in journal.records if r.get("kind") == "survivors"]
    if not made:
        return None
    keys = set(made[-1]["keys"])
    return [(k, c) for k, c in keyed if k in keys]


def _keyed(candidates: list[Candidate], gemms: str) -> list[tuple[str, Candidate]]:
    """(journal key, candidate) per evaluation a candidate gets: one joint, or one per GEMM."""
    if gemms == "split":
        return [(split_key(g, c.key()), c) for c in candidates for g in GEMMS]
    return [(c.key(), c) for c in candidates]


def _roles(gemms: str) -> tuple[str | None, ...]:
    """What winners are chosen for: the op as a whole (None), or each GEMM."""
    return GEMMS if gemms == "split" else (None,)


def _run_pairs(problem, platform, journal: Journal, replays, progress, runner: Runner,
               pairs) -> None:  # fmt: skip
    """Prune, then evaluate the (key, candidate or None for the default, batch size) pairs that
    the journal does not hold yet."""
    done = journal.done()
    total = len(pairs)
    count = [0]

    def on_record(record: dict[str, Any]) -> None:
        record.setdefault("t", round(time.time(), 2))
        _tag_gemm(record)
        journal.append(record)
        count[0] += 1
        if progress:
            progress(count[0], total, f"M={record['M']} {record['candidate']}: {record['status']}")

    work: list[tuple[str, dict[str, Any], int, int]] = []
    for key, cand, M in pairs:
        if (key, M) in done:
            count[0] += 1
            continue
        if cand is None:
            config = heuristic(problem, M)
            reason = None
        else:
            config = cand.as_config()
            reason = prune_reason(cand, platform, problem, M)
        if reason is not None:
            on_record({"candidate": key, "M": M, "config": config, "status": "pruned",
                       "reason": reason})  # fmt: skip
        else:
            work.append((key, config, M, replays))
    runner.run(work, on_record)


def _tag_gemm(record: dict[str, Any]) -> None:
    """A split sweep's records say which GEMM they tuned (``gemm``), for export and ranking."""
    gemm = gemm_of(record["candidate"])
    if gemm is not None:
        record["gemm"] = gemm


def _time_finalists(journal: Journal, batch_sizes, execution: Execution, progress,
                    runner: Runner, incumbent: dict[int, dict[str, Any]]) -> None:  # fmt: skip
    """Re-time the FINALISTS fastest candidates of each batch size with more replays and re-check
    them on fresh inputs, on the same workers as the sweep (recorded as ``final:<key>``, so a
    resume skips them). A joint sweep's ``incumbent`` entry at a batch size is a finalist too
    when it passed there (:func:`finalists`)."""
    done = journal.done()
    have_winner = {(r["M"], r.get("gemm")) for r in journal.records if r.get("kind") == "winner"}
    work = []
    for M in batch_sizes:
        for gemm in _roles(execution.gemms):
            if (M, gemm) in have_winner:
                continue
            held = incumbent.get(M) if gemm is None else None
            default = _default_record(journal, M) if gemm is None else None
            for r in finalists(ranked_ok(journal, M, gemm), held, default):
                key = f"{FINAL_PREFIX}{r['candidate']}"
                if (key, M) not in done:
                    work.append((key, r["config"], M, FINAL_REPLAYS))

    def on_record(record: dict[str, Any]) -> None:
        record.update(phase="final", t=round(time.time(), 2))
        _tag_gemm(record)
        journal.append(record)

    if work and progress:
        progress(0, 0, f"re-timing {len(work)} finalists")
    runner.run(work, on_record)


def finalists(ranked: list[dict[str, Any]], incumbent: dict[str, Any] | None = None,
              default: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The FINALISTS fastest of ``ranked`` (first-pass records, fastest first), and the record of
    the ``incumbent`` config where it ranked below them. A re-tune then replaces an entry only
    with one that beat it in the finalists' longer timing, not in the first pass's few replays:
    re-tuning Mixtral-8x7B TP2 bf16 on an H100, the first pass put the shipped M=4096 entry 6%
    behind a config that `moetune bench` then measured 5% slower than it, and the shipped
    entry was not re-timed (results/tables/h100-0.2.8-mixtral-retune/).

    The ``default`` record (the heuristic config's first-pass pair, which every sweep times) is
    a finalist too where it beat the slowest of the FINALISTS and its config is not among them:
    a halving sweep may not carry that config past its anchors, or a restricted space may not
    hold it, and an entry slower than no table at all is no tuning. Re-tuning Qwen3-30B-A3B TP2
    fp8 on an H100, the default's first pass read 122.8 µs at M=128, every finalist 125.3 µs
    or more, and `moetune bench` then timed the exported entry 2.7% slower than the default
    (results/tables/h100-0.2.15-qwen3-fp8-retune/)."""
    chosen = ranked[:FINALISTS]
    if incumbent is not None and all(r["config"] != incumbent for r in chosen):
        chosen += [r for r in ranked[FINALISTS:] if r["config"] == incumbent][:1]
    if default is not None and all(r["config"] != default["config"] for r in chosen):
        slowest = ranked[FINALISTS - 1]["timing"]["median_us"] if len(ranked) >= FINALISTS else None
        if slowest is None or default["timing"]["median_us"] < slowest:
            chosen.append(default)
    return chosen


def _default_record(journal: Journal, M: int) -> dict[str, Any] | None:
    """The heuristic default's first-pass record at ``M`` where it passed, else None."""
    return next((r for r in journal.records if r.get("M") == M and r.get("candidate") == "default"
                 and r.get("status") == "ok" and r.get("phase") not in ("final", "pair")),
                None)  # fmt: skip


def _time_pairs(journal: Journal, batch_sizes, progress, runner: Runner, winners: dict,
                incumbent: dict[int, dict[str, Any]]) -> None:  # fmt: skip
    """A split sweep's winners timed together, beside the up winner on both GEMMs and the
    incumbent on both (:mod:`moetune.pairs`), with the finalists' replays, on the sweep's
    workers (recorded as ``pair:<up>|<down>``, so a resume skips them)."""
    done = journal.done()
    work = []
    for M in batch_sizes:
        up, down = winners.get((M, "up")), winners.get((M, "down"))
        if up is None or down is None or decided(journal, M):
            continue
        work += [(key, config, M, FINAL_REPLAYS)
                 for key, config in pair_options(up, down, incumbent.get(M))
                 if (key, M) not in done]  # fmt: skip

    def on_record(record: dict[str, Any]) -> None:
        record.update(phase="pair", gemm="pair", t=round(time.time(), 2))
        journal.append(record)

    if work and progress:
        progress(0, 0, f"timing {len(work)} up/down pairs together")
    runner.run(work, on_record)


def _finish(
    problem, platform, journal: Journal, batch_sizes, device, progress, execution: Execution,
    runner: Runner, incumbent: dict[int, dict[str, Any]],
) -> list[BatchResult]:  # fmt: skip
    """Per batch size: record the winner, the fastest re-timed finalist whose re-check on fresh
    inputs passed (one per GEMM in a split sweep, the down one also checked together with the up
    one, then settled by the pairs timed together: :func:`moetune.pairs.settle`). Finalists
    come re-checked from the workers; only the pair checks of a split sweep and finalists of
    older journals are checked here, on inputs built when first needed."""
    built: list[Workload] = []

    def workload() -> Workload:
        if not built:
            built.append(Workload(problem, platform, batch_sizes, device, execution.skew,
                                  execution.act_scales,
                                  timing=False))  # fmt: skip
        return built[0]

    # The last record of each (M, GEMM) counts; settled ones only once committed (moetune.pairs).
    done = committed(journal.records)
    winners = {(r["M"], r.get("gemm")): r for r in journal.records
               if r.get("kind") == "winner" and counts(r, done)}  # fmt: skip
    for M in batch_sizes:
        finals = [r for r in journal.records if r.get("M") == M and r.get("phase") == "final"]
        for gemm in _roles(execution.gemms):
            if (M, gemm) in winners:
                continue
            # The down winner must pass together with the up winner: no up winner, no down one.
            partner = winners.get((M, "up")) if gemm == "down" else None
            mine = [r for r in finals if r.get("gemm") == gemm]
            winners[M, gemm] = (
                None if gemm == "down" and partner is None
                else _pick_winner(problem, workload, mine, M, journal, progress, partner)
            )  # fmt: skip
    if execution.gemms == "split":
        if built and device == "cuda":  # the pair checks' memory back before workers restart
            import torch

            torch.cuda.empty_cache()
        _time_pairs(journal, batch_sizes, progress, runner, winners, incumbent)
        runner.close()
        for M in batch_sizes:
            if winners.get((M, "up")) is not None and winners.get((M, "down")) is not None:
                winners[M, "up"], winners[M, "down"] = settle(
                    problem, workload, journal, M, winners[M, "up"], winners[M, "down"],
                    (lambda msg: progress(0, 0, msg)) if progress else None,
                    incumbent=incumbent.get(M), vllm_safe=execution.vllm_safe,
                )  # fmt: skip
    results = []
    for M in batch_sizes:
        recs = [r for r in journal.records if r.get("M") == M and "candidate" in r
                and r.get("phase") not in ("final", "pair")]  # fmt: skip
        counted: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for r in recs:
            if r["candidate"] == "default":
                continue
            counted[r["status"]] = counted.get(r["status"], 0) + 1
            if r["status"] in ("rejected", "failed"):
                short = r["reason"].split(":")[0]
                reasons[short] = reasons.get(short, 0) + 1
        default = _default_record(journal, M)
        default_us = default["timing"]["median_us"] if default else None
        best = winners.get((M, _roles(execution.gemms)[0]))
        if best is not None and default is not None and best.get("default_us") is None:
            best["default_us"] = default_us
        down = winners.get((M, "down"))
        both = pair_time(journal, M, best, down) if best and down else None
        results.append(BatchResult(M, best, default_us, counted, reasons, down, both))
    return results


def _pick_winner(problem, workload: Callable[[], Workload], finals, M, journal: Journal,
                 progress, partner: dict | None = None) -> dict | None:  # fmt: skip
    """The fastest re-timed finalist that also passes a check on fresh inputs; with ``partner``
    (the up winner, when picking the down one) also a check of the two together."""
    ok = sorted((r for r in finals if r["status"] == "ok"), key=lambda r: r["timing"]["median_us"])
    for n, r in enumerate(ok):
        name = r["candidate"].removeprefix(FINAL_PREFIX)
        gemm = r.get("gemm")
        check = r.get("recheck")
        if check is None:  # a journal from before finalists were re-checked on their workers
            up, down = gemm_configs(problem, r["candidate"], r["config"], M)
            check = recheck(problem, workload(), up, M, seed=RECHECK_SEED + M, config_down=down)
        extra: dict[str, Any] = {} if gemm is None else {"gemm": gemm}
        if check["ok"] and partner is not None:
            pair = recheck(problem, workload(), partner["config"], M, seed=2 * RECHECK_SEED + M,
                           config_down=r["config"])  # fmt: skip
            extra.update(pair_recheck=pair, pair_up=partner["config"])
            if not pair["ok"]:
                check = {**check, "ok": False, "reason": f"with the up winner: {pair['reason']}"}
        if progress:
            progress(0, 0, f"M={M} winner {name}: recheck {'ok' if check['ok'] else 'FAILED'}")
        if check["ok"]:
            winner = {"kind": "winner", "M": M, "winner": name, "config": r["config"],
                      "timing": r["timing"], "recheck": check, "rank": n, **extra}  # fmt: skip
            journal.append(winner)
            return winner
        journal.append({"kind": "recheck-failed", "M": M, "failed": name, "recheck": check,
                        **extra})  # fmt: skip
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
