"""A split sweep's two winners, timed together before they count.

Each GEMM's winner was timed with the other GEMM at the heuristic default, so the pair of
winners itself was never timed, and on one H100 it came out 5.5% slower than the joint table it
replaced at one batch size (Qwen3-30B-A3B fp8 M=2048, results/tables/h100-0.2.6-split/). So at
each batch size a split sweep also times, with the finalists' replays:

- ``W``: the up winner with the down winner (what moetune's op runs from the two tables);
- ``U``: the up winner on both GEMMs (what vLLM runs: it reads the main table only);
- ``I``: the incumbent table's entry on both GEMMs, when there is one (what runs today).

If ``W`` is the fastest, the winners stand. Otherwise the fastest pair becomes the two winners
(``settled`` records, which outrank the per-GEMM winners in export) once it passes a check on
fresh inputs. A ``pair-choice`` record keeps the decision, so a resumed sweep keeps it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moetune.evaluate import RECHECK_SEED, Workload, recheck
from moetune.gemms import FINAL_PREFIX, PAIR_PREFIX, pair_key
from moetune.journal import Journal
from moetune.problem import Problem
from moetune.space import Candidate

PAIR_SEED = 3 * RECHECK_SEED  # a settled pair's check on fresh inputs: other draws than rechecks


def bare(name: str) -> str:
    """A candidate key without its ``final:`` and role (``up:``/``down:``) prefixes."""
    return name.removeprefix(FINAL_PREFIX).split(":", 1)[-1]


def config_name(config: dict[str, Any]) -> str:
    """The candidate key of a table entry (``incumbent`` when it is not a valid config)."""
    try:
        return Candidate.from_config(config).key()
    except (TypeError, ValueError):
        return "incumbent"


def provisional(journal: Journal, M: int, gemm: str) -> tuple[str, dict[str, Any]] | None:
    """``(bare key, config)`` of the winner the sweep will pick for ``gemm`` at ``M``: the
    journaled winner, else the fastest re-timed finalist whose re-check passed."""
    for r in reversed(journal.records):
        if r.get("kind") == "winner" and r.get("M") == M and r.get("gemm") == gemm:
            return bare(r["winner"]), r["config"]
    finals = [r for r in journal.records if r.get("M") == M and r.get("phase") == "final"
              and r.get("gemm") == gemm and r.get("status") == "ok"
              and (r.get("recheck") or {}).get("ok")]  # fmt: skip
    if not finals:
        return None
    best = min(finals, key=lambda r: r["timing"]["median_us"])
    return bare(best["candidate"]), best["config"]


def options(
    journal: Journal, M: int, incumbent: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """``(pair key, {"up": ..., "down": ...})`` of W, U and I at ``M`` (see the module doc),
    without repeats; none without an up and a down winner."""
    up, down = provisional(journal, M, "up"), provisional(journal, M, "down")
    if up is None or down is None:
        return []
    found = [(up, down), (up, up)]
    if incumbent is not None:
        name = config_name(incumbent)
        found.append(((name, incumbent), (name, incumbent)))
    out: dict[str, dict[str, Any]] = {}
    for (un, uc), (dn, dc) in found:
        out.setdefault(pair_key(un, dn), {"up": uc, "down": dc})
    return list(out.items())


def settle(
    problem: Problem,
    workload: Callable[[], Workload],
    journal: Journal,
    M: int,
    up: dict[str, Any],
    down: dict[str, Any],
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (up, down) winner records at ``M`` after the pairs timed there (see the module doc).
    Unchanged when ``W`` was not timed (its down winner changed after the pairs ran: a pair
    check turned the first one down) or was the fastest."""
    if any(r.get("kind") == "pair-choice" and r.get("M") == M for r in journal.records):
        return up, down  # decided before: its settled winners (if any) are the records given
    timed = {
        r["candidate"]: r
        for r in journal.records
        if r.get("M") == M and r.get("phase") == "pair" and r.get("status") == "ok"
    }
    mine = pair_key(bare(up["winner"]), bare(down["winner"]))
    if mine not in timed:
        return up, down
    ranked = sorted(timed.values(), key=lambda r: r["timing"]["median_us"])
    say = ", ".join(f"{r['candidate'].removeprefix(PAIR_PREFIX)} "
                    f"{r['timing']['median_us']:.1f} µs" for r in ranked)  # fmt: skip
    for best in ranked:
        if best["candidate"] == mine:
            journal.append({"kind": "pair-choice", "M": M, "chosen": mine, "kept": True})
            if progress:
                progress(f"M={M} pairs: {say}: the winners stand")
            return up, down
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
                        "kept": False})  # fmt: skip
        if progress:
            progress(f"M={M} pairs: {say}: {best['candidate'].removeprefix(PAIR_PREFIX)} "
                     "replaces the winners")  # fmt: skip
        return new_up, new_down
    return up, down  # unreachable: the winners' own pair is among those ranked
