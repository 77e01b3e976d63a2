"""Tuning the op's two GEMMs apart (``moetune sweep --gemms split``).

The up projection (w1: ``[E, 2N, K]``) and the down projection (w2: ``[E, K, N]``) have different
shapes, so their best tiles differ. A split sweep evaluates every candidate twice per batch size:
once as the up GEMM's config with the down GEMM at the heuristic default, once the other way
round. Both runs check and time the whole op, so the numbers are comparable with a joint sweep's.

The role travels in the journal's candidate key (``up:<key>``, ``down:<key>``, and
``final:up:<key>`` when re-timed), so workers need nothing beyond the (key, config) pair they
already get, and resume skips what is done exactly as in a joint sweep.

Each winner was timed with the *other* GEMM at the heuristic default, so the two winners are
also timed together before they count (:mod:`moetune.pairs`): a pair's key is
``pair:<up key>|<down key>`` and its config ``{"up": {...}, "down": {...}}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moetune.defaults import default_config
from moetune.problem import Problem

GEMM_MODES = ("joint", "split")
GEMMS = ("up", "down")
# Journal keys of finalists (re-timed with more replays, and re-checked on fresh inputs).
FINAL_PREFIX = "final:"
# Journal keys of an (up, down) pair of configs timed together (split sweeps, moetune.pairs).
PAIR_PREFIX = "pair:"


def split_key(gemm: str, key: str) -> str:
    """The journal key of candidate ``key`` tuned for ``gemm`` alone."""
    return f"{gemm}:{key}"


def pair_key(up: str, down: str) -> str:
    """The journal key of candidate ``up`` on the up GEMM together with ``down`` on the down one
    (bare candidate keys, no role prefix)."""
    return f"{PAIR_PREFIX}{up}|{down}"


def committed(records: Iterable[dict[str, Any]]) -> set[tuple[Any, Any]]:
    """``(M, pair key)`` of each pair a ``pair-choice`` record committed as the new winners."""
    return {(r.get("M"), r.get("chosen")) for r in records
            if r.get("kind") == "pair-choice" and not r.get("kept")}  # fmt: skip


def counts(record: dict[str, Any], done: set[tuple[Any, Any]]) -> bool:
    """Whether a winner record counts: not settled, or settled and committed (``done``)."""
    return not record.get("settled") or (record.get("M"), record.get("pair")) in done


def gemm_of(key: str) -> str | None:
    """The GEMM a journal key tunes alone, ``"pair"`` for a pair of configs timed together, or
    None for a joint key (or ``default``)."""
    if key.startswith(PAIR_PREFIX):
        return "pair"
    bare = key.removeprefix(FINAL_PREFIX)
    role = bare.split(":", 1)[0]
    return role if role in GEMMS and ":" in bare else None


def heuristic(problem: Problem, M: int) -> dict[str, Any]:
    """The heuristic default the untuned GEMM runs with (and the sweep's ``default`` pair)."""
    return default_config(M, problem.E, problem.N, problem.K, problem.topk,
                          dtype=problem.torch_dtype, quant=problem.quant,
                          block_shape=problem.block_shape)  # fmt: skip


def gemm_configs(
    problem: Problem, key: str, config: dict[str, Any], M: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (up, down) configs a journal key runs with: ``config`` on its GEMM and the heuristic
    default on the other for a split key; ``config["up"]`` and ``config["down"]`` for a pair;
    ``config`` on both for a joint one."""
    gemm = gemm_of(key)
    if gemm == "pair":
        return config["up"], config["down"]
    if gemm == "up":
        return config, heuristic(problem, M)
    if gemm == "down":
        return heuristic(problem, M), config
    return config, config
