"""Successive halving across batch sizes (``--strategy halving``): every candidate at three
anchor batch sizes, then only the fastest at the others, a ``--keep`` fraction of them or, under
``--budget SECONDS``, as many as fit the time left.

Under a budget, the journal says after the anchor round what a pair costs (the anchor records'
evaluation time, shared by the workers that ran in parallel). The second round takes the fastest
candidates in rank order at every anchor, as many as keep its pairs, the defaults and the
finalists' re-timing within what is left; at least MIN_KEEP of each ranking go on whatever the
budget, so every batch size still gets a choice.

A re-tune that halves can drop the config the current table uses at a batch size: a candidate
slow at the three anchors may still be the fastest at another batch size. On an H200, a
static-scale re-tune of Qwen3-30B-A3B TP2 fp8 did just that at M=512: the shipped entry never
went past the anchors and the new table's was 8% slower there in ``moetune bench``
(results/tables/h200-0.2.4-static/). So the sweep also times the incumbent table's entry at each
batch size it would otherwise skip there (:func:`incumbent_pairs`): the new table's winner at a
batch size is then never one the sweep timed slower than the incumbent's.
"""

from __future__ import annotations

import math
from typing import Any

from moetune.gemms import gemm_of
from moetune.journal import Journal

MIN_KEEP = 4
# A finalist's pair (40 replays, then a re-check on fresh inputs) costs about 3 first-pass
# pairs: 72 finalists took 8.3 s and 13,186 first-pass pairs 503.7 s on one H100
# (results/full-space-0.3/).
FINAL_COST = 3.0


def anchors(batch_sizes: list[int]) -> list[int]:
    """The smallest, a middle and the largest batch size: decode, mixed and prefill regimes."""
    ordered = sorted(batch_sizes)
    return sorted({ordered[0], ordered[len(ordered) // 2], ordered[-1]})


def ranked_ok(journal: Journal, M: int, gemm: str | None = None) -> list[dict[str, Any]]:
    """First-pass records of tuned candidates (for ``gemm``, None: joint) that passed at ``M``,
    fastest first."""
    ok = [r for r in journal.records if r.get("M") == M and r.get("status") == "ok"
          and r.get("phase") != "final" and r.get("candidate") != "default"
          and r.get("gemm") == gemm]  # fmt: skip
    return sorted(ok, key=lambda r: r["timing"]["median_us"])


def survivors(journal: Journal, keyed: list, at: list[int], keep: float) -> list:
    """Keyed candidates among the fastest ``keep`` fraction (at least MIN_KEEP) of their GEMM
    (or of the joint sweep) at any anchor batch size ``at``."""
    roles = {gemm_of(k) for k, _ in keyed}
    n_keep = max(MIN_KEEP, math.ceil(keep * len(keyed) / len(roles)))
    chosen: set[str] = set()
    for M in at:
        for gemm in roles:
            chosen.update(r["candidate"] for r in ranked_ok(journal, M, gemm)[:n_keep])
    return [(k, c) for k, c in keyed if k in chosen]


def survivors_within(journal: Journal, keyed: list, at: list[int], rest: int, budget_s: float,
                     elapsed_s: float, workers: int, fixed_pairs: float,
                     keep: float) -> tuple[list, str]:  # fmt: skip
    """Keyed candidates that go on to the ``rest`` other batch sizes within ``budget_s``, with
    a note on how they were counted. ``fixed_pairs``: what the defaults and finalists still cost,
    in first-pass pairs. With no times at the anchors (an old journal), ``keep`` decides."""
    roles = sorted({gemm_of(k) for k, _ in keyed}, key=str)
    firsts = [r for r in journal.records if r.get("M") in at and r.get("phase") != "final"
              and r.get("candidate") != "default"]  # fmt: skip
    pair_s = pair_seconds(firsts, workers)
    if pair_s is None:
        return survivors(journal, keyed, at, keep), " (--budget: no times at the anchors)"
    affordable = affordable_pairs(budget_s, elapsed_s, pair_s, fixed_pairs)
    ranked = [[r["candidate"] for r in ranked_ok(journal, M, g)] for M in at for g in roles]
    chosen = take_within(ranked, rest, affordable)
    how = (f" (--budget {budget_s:.0f} s: {elapsed_s:.0f} s spent, {pair_s * 1000:.0f} ms a "
           f"pair, room for {affordable} pairs)")  # fmt: skip
    if elapsed_s >= budget_s:  # the anchor round is never cut short; say so
        how += (f"; the budget is spent: only the {MIN_KEEP} fastest of each ranking go on, and "
                "the sweep will take longer than --budget")  # fmt: skip
    return [(k, c) for k, c in keyed if k in chosen], how


def incumbent_pairs(keyed: list, incumbent: dict[int, dict[str, Any]], rest: list[int],
                    kept: set[str]) -> list:  # fmt: skip
    """``(key, candidate, M)`` for each batch size ``M`` in ``rest`` whose ``incumbent`` entry
    (the config the runtime would use at ``M``) is a candidate of the space that did not go on
    (not in ``kept``). Entries outside the space are left out: the caller can tell by count."""
    by_config: dict[tuple, list] = {}
    for key, cand in keyed:  # a split sweep keys each candidate once per GEMM
        by_config.setdefault(tuple(sorted(cand.as_config().items())), []).append((key, cand))
    pairs = []
    for M in rest:
        config = incumbent.get(M)
        if config is None:
            continue
        for key, cand in by_config.get(tuple(sorted(config.items())), []):
            if key not in kept:
                pairs.append((key, cand, M))
    return pairs


def pair_seconds(records: list[dict[str, Any]], workers: int) -> float | None:
    """Wall seconds one more pair costs: mean evaluation time over ``workers`` in parallel."""
    evals = [r["eval_s"] for r in records if isinstance(r.get("eval_s"), int | float)]
    if not evals:
        return None
    return sum(evals) / len(evals) / max(1, workers)


def affordable_pairs(budget_s: float, elapsed_s: float, pair_s: float, fixed_pairs: float) -> int:
    """Pairs that fit what is left of ``budget_s`` once ``fixed_pairs`` (defaults, finalists,
    in first-pass pairs) are paid for."""
    left = budget_s - elapsed_s - fixed_pairs * pair_s
    return max(0, math.floor(left / max(pair_s, 1e-9) + 1e-6))  # 39.9999... pairs are 40


def take_within(ranked: list[list[str]], per_candidate: int, affordable: int,
                minimum: int = MIN_KEEP) -> set[str]:  # fmt: skip
    """The top ``n`` of every ranking, together, for the largest ``n`` whose candidates'
    pairs (``per_candidate`` each) fit ``affordable``; ``n`` is at least ``minimum``."""
    chosen: set[str] = set()
    longest = max((len(r) for r in ranked), default=0)
    for n in range(longest):
        grown = chosen | {r[n] for r in ranked if n < len(r)}
        if n >= minimum and len(grown) * per_candidate > affordable:
            break
        chosen = grown
    return chosen
