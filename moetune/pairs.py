"""A split sweep's two winners, timed together before they count.

Each GEMM's winner was timed with the other GEMM at the heuristic default, so the pair of
winners itself was never timed, and on one H100 it came out 5.5% slower than the joint table it
replaced at one batch size (Qwen3-30B-A3B fp8 M=2048, results/tables/h100-0.2.6-split/). So
once the winners are chosen (the down one checked together with the up one), a split sweep
also times at each batch size, with the finalists' replays:

- ``W``: the up winner with the down winner (what moetune's op runs from the two tables);
- ``U``: the up winner on both GEMMs (what vLLM runs: it reads the main table only);
- ``I``: the incumbent table's entry on both GEMMs, when there is one (what runs today);
- ``V``: the incumbent's entry on the up GEMM with the down winner, when there is an incumbent
  (a pair whose main-table entry is the incumbent's: vLLM runs the same as today).

vLLM reads only the main table and runs its entry, the up winner, on both GEMMs: that is ``U``.
On an H200 a split sweep's ``U`` was up to 18% slower than ``I`` (results/tables/h200-0.2.7-split/).
So by default (``vllm_safe``) a pair whose up entry is the up winner (``W``, ``U``) counts only if
``U`` passed and is at most :data:`VLLM_MARGIN` slower than ``I``; ``I`` and ``V`` always count.

If ``W`` counts, passed and is the fastest, the winners stand. Otherwise the fastest passing pair
that counts replaces them once it also passes a check on fresh inputs: two ``settled`` winner
records, then
a ``pair-choice`` record that commits them. Settled records count only once committed (export
and a resumed sweep skip uncommitted ones, as a sweep killed between the appends leaves them),
and a committed decision is never taken again. A ``W`` that failed its check with no passing
alternative is kept with a warning: the tables then hold what the per-GEMM checks passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moetune.evaluate import RECHECK_SEED, Workload, recheck
from moetune.gemms import FINAL_PREFIX, PAIR_PREFIX, pair_key
from moetune.journal import Journal
from moetune.problem import Problem
from moetune.space import Candidate

PAIR_SEED = 3 * RECHECK_SEED  # a settled pair's check on fresh inputs: other draws than rechecks
# How much slower than the incumbent on both GEMMs the main table's entry on both (U) may be for
# a pair with that entry to count under vllm_safe: about the spread of re-timing one op.
VLLM_MARGIN = 0.01


def bare(name: str) -> str:
    """A candidate key without its ``final:`` and role (``up:``/``down:``) prefixes."""
    return name.removeprefix(FINAL_PREFIX).split(":", 1)[-1]


def config_name(config: dict[str, Any]) -> str:
    """The candidate key of a table entry (``incumbent`` when it is not a valid config)."""
    try:
        return Candidate.from_config(config).key()
    except (TypeError, ValueError):
        return "incumbent"


def decided(journal: Journal, M: int) -> bool:
    return any(r.get("kind") == "pair-choice" and r.get("M") == M for r in journal.records)


def roles(
    up: dict[str, Any], down: dict[str, Any], incumbent: dict[str, Any] | None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{"W"|"U"|"I"|"V": (pair key, {"up": ..., "down": ...})}`` for the winner records ``up``
    and ``down`` and the ``incumbent`` entry (see the module doc; no ``I`` or ``V`` without
    one)."""
    un, dn = bare(up["winner"]), bare(down["winner"])
    named = {"W": (pair_key(un, dn), {"up": up["config"], "down": down["config"]}),
             "U": (pair_key(un, un), {"up": up["config"], "down": up["config"]})}  # fmt: skip
    if incumbent is not None:
        name = config_name(incumbent)
        named["I"] = (pair_key(name, name), {"up": incumbent, "down": incumbent})
        named["V"] = (pair_key(name, dn), {"up": incumbent, "down": down["config"]})
    return named


def options(
    up: dict[str, Any], down: dict[str, Any], incumbent: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """``(pair key, {"up": ..., "down": ...})`` of W, U, I and V (:func:`roles`), without
    repeats: the pairs to time."""
    return list(dict(roles(up, down, incumbent).values()).items())


def _timed(journal: Journal, M: int) -> dict[str, dict[str, Any]]:
    return {r["candidate"]: r for r in journal.records
            if r.get("M") == M and r.get("phase") == "pair"}  # fmt: skip


def pair_time(journal: Journal, M: int, up: dict[str, Any], down: dict[str, Any]) -> float | None:
    """The time (µs) of the winners ``up`` and ``down`` timed together at ``M``, if they were
    and passed."""
    r = _timed(journal, M).get(pair_key(bare(up["winner"]), bare(down["winner"])))
    return r["timing"]["median_us"] if r is not None and r.get("status") == "ok" else None


def settle(
    problem: Problem,
    workload: Callable[[], Workload],
    journal: Journal,
    M: int,
    up: dict[str, Any],
    down: dict[str, Any],
    progress: Callable[[str], None] | None = None,
    *,
    incumbent: dict[str, Any] | None = None,
    vllm_safe: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (up, down) winner records at ``M`` after the pairs timed there (see the module doc):
    only W, U, I and V of these winners and this ``incumbent`` count, not pairs an earlier run
    timed for others; with ``vllm_safe`` W and U only where U is safe for vLLM. Unchanged when
    decided before (``up`` and ``down`` are then the committed ones) or when ``W`` has no record
    yet (a sweep cut before timing it: the next run decides)."""
    if decided(journal, M):
        return up, down
    named = roles(up, down, incumbent)
    keys = {key for key, _ in named.values()}
    timed = {k: r for k, r in _timed(journal, M).items() if k in keys}
    mine = named["W"][0]
    if mine not in timed:
        return up, down
    mine_ok = timed[mine].get("status") == "ok"
    ranked = sorted((r for r in timed.values() if r.get("status") == "ok"),
                    key=lambda r: r["timing"]["median_us"])  # fmt: skip
    say = ", ".join(f"{r['candidate'].removeprefix(PAIR_PREFIX)} "
                    f"{r['timing']['median_us']:.1f} µs" for r in ranked)  # fmt: skip
    if not mine_ok:
        say += f"; the winners together: {timed[mine].get('reason', 'not ok')}"
    penalty = _vllm_penalty(timed, named)
    unsafe = vllm_safe and penalty is not None and penalty > VLLM_MARGIN
    up_name = bare(up["winner"])
    why = ""
    if unsafe and ranked and _up_name(ranked[0]) == up_name:  # the rule passed over the fastest
        why = (" (vLLM-safe: the up winner on both GEMMs, which vLLM runs from the main table, "
               + ("failed its check)" if penalty == math.inf
                  else f"is {penalty:.1%} slower than the incumbent)"))  # fmt: skip
    for best in ranked:
        if unsafe and _up_name(best) == up_name:
            continue  # its main-table entry is the up winner: vLLM would run U
        if best["candidate"] == mine:
            break
        cu, cd = best["config"]["up"], best["config"]["down"]
        check = recheck(problem, workload(), cu, M, seed=PAIR_SEED + M, config_down=cd)
        if not check["ok"]:
            journal.append({"kind": "recheck-failed", "M": M, "failed": best["candidate"],
                            "recheck": check, "gemm": "pair"})  # fmt: skip
            continue
        un, dn = best["candidate"].removeprefix(PAIR_PREFIX).split("|", 1)
        common = {"kind": "winner", "M": M, "timing": best["timing"], "recheck": check,
                  "settled": True, "pair": best["candidate"]}  # fmt: skip
        new_up = {**common, "gemm": "up", "winner": f"up:{un}", "config": cu}
        new_down = {**common, "gemm": "down", "winner": f"down:{dn}", "config": cd,
                    "pair_recheck": check, "pair_up": cu}  # fmt: skip
        journal.append(new_up)
        journal.append(new_down)
        journal.append({"kind": "pair-choice", "M": M, "chosen": best["candidate"],
                        "kept": False, "vllm_safe": vllm_safe})  # fmt: skip
        if progress:
            progress(f"M={M} pairs: {say}: {best['candidate'].removeprefix(PAIR_PREFIX)} "
                     f"replaces the winners{why}")  # fmt: skip
        return new_up, new_down
    choice = {"kind": "pair-choice", "M": M, "chosen": mine, "kept": True, "vllm_safe": vllm_safe}
    if not mine_ok:
        choice["warning"] = ("the winners' pair failed its check and no other pair passed; its "
                             "winners stand on their own checks")  # fmt: skip
    elif unsafe:
        choice["warning"] = ("no vLLM-safe pair passed: the main table holds the up winner, "
                             "which vLLM runs on both GEMMs")  # fmt: skip
    journal.append(choice)
    if progress:
        verdict = "the winners stand"
        if not mine_ok:
            verdict = "WARNING: no pair passed; the winners stand on their own checks"
        elif unsafe:
            verdict = "WARNING: no vLLM-safe pair passed; the winners stand"
        progress(f"M={M} pairs: {say}: {verdict}{_vllm_note(ranked, named)}")
    return up, down


def _up_name(record: dict[str, Any]) -> str:
    """The up GEMM's candidate key of a pair record."""
    return record["candidate"].removeprefix(PAIR_PREFIX).split("|", 1)[0]


def _vllm_penalty(
    timed: dict[str, dict[str, Any]], named: dict[str, tuple[str, Any]]
) -> float | None:
    """How much slower U (the up winner on both GEMMs) timed than I (the incumbent on both), as
    a fraction; ``inf`` when U did not pass (with or without an I); None without U timed or
    without an I that passed."""
    i = timed.get(named["I"][0]) if "I" in named else None
    u = timed.get(named["U"][0])
    if u is not None and u.get("status") != "ok":
        return math.inf  # vLLM would run an entry that fails on the down GEMM
    if i is None or i.get("status") != "ok" or u is None:
        return None
    return u["timing"]["median_us"] / i["timing"]["median_us"] - 1


def _vllm_note(ranked: list[dict[str, Any]], named: dict[str, tuple[str, Any]]) -> str:
    """Where the winners stand but the up winner on both GEMMs (U: what vLLM runs from the main
    table) timed slower than the incumbent on both (I): by how much, so a vLLM user can tell.
    ``named``: :func:`roles`."""
    by_key = {r["candidate"]: r for r in ranked}
    u = by_key.get(named["U"][0])
    i = by_key.get(named["I"][0]) if "I" in named else None
    if u is None or i is None or u is i:
        return ""
    slower = u["timing"]["median_us"] / i["timing"]["median_us"] - 1
    if slower <= VLLM_MARGIN:
        return ""
    return (
        f" (vLLM, which runs the main table's entry on both GEMMs, would be {slower:.1%} "
        "slower than the incumbent here)"
    )
