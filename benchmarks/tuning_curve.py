"""The tuning-time curve: evaluations and minutes a budgeted search needs to come within 1%, 2%
and 5% of the exhaustive best, replayed from an exhaustive journal.

An exhaustive full-space journal holds a first-pass time and an ``eval_s`` (the wall time that
pair cost its GPU worker) for every (candidate, batch size). A strategy that evaluates a subset
of those pairs picks, per batch size, its fastest evaluated candidate; its distance from the
exhaustive best is that candidate's time over the best time, both from the same journal (so
measurement noise cancels: the curve compares searches, not timer runs). Its cost is the
pairs it evaluates and the sum of their ``eval_s`` (GPU-busy time on one GPU; compiling runs
beside it in moetune and is reported separately from the sweep's own log).

Strategies replayed:
  exhaustive-fast      every candidate of the fast space (a subset of the full space)
  halving(k)           every candidate at the smallest, middle and largest batch size, the
                       fastest k of them (fraction; at least 4) at the others (moetune's
                       --strategy halving --keep k), on the full or the fast space
  random(n)            n random candidates per batch size (mean over 20 draws)

A real budgeted run is checked against the same exhaustive journal with ``--run``: its winner
per batch size is looked up there and its distance from the best reported.

Usage: python benchmarks/tuning_curve.py JOURNAL [JOURNAL ...] [--json out.json] [--md out.md]
       python benchmarks/tuning_curve.py EXHAUSTIVE --run RUN_JOURNAL
Journals may be gzipped (``.jsonl.gz``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import statistics
import sys
from pathlib import Path

THRESHOLDS = (0.01, 0.02, 0.05)
KEEPS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5)
RANDOM_N = (4, 8, 16, 32, 64, 128, 256)


def load(path: Path) -> tuple[dict, dict[int, dict[str, tuple[float, float]]], float, int]:
    """Header, {M: {candidate: (median_us, eval_s)}} of first-pass ok records, the seconds spent
    on failed or rejected pairs, and how many candidates the (finished part of the) space has."""
    lines = _read_lines(path)
    header = json.loads(lines[0])
    if header.get("gemms", "joint") != "joint":
        raise SystemExit(f"{path}: a --gemms split journal; the replay handles joint sweeps only")
    table: dict[int, dict[str, tuple[float, float]]] = {}
    other = 0.0
    records = [json.loads(line) for line in lines[1:] if line.strip()]
    seen: dict[str, set[int]] = {}
    for r in records:
        if "candidate" in r and r.get("phase") != "final":
            seen.setdefault(r["candidate"], set()).add(r["M"])
    # A journal cut short is exhaustive over the candidates it finished at every batch size.
    complete = {c for c, ms in seen.items() if len(ms) == len(header["batch_sizes"])}
    for r in records:
        if "candidate" not in r or r.get("phase") == "final" or r["candidate"] == "default":
            continue
        if r["candidate"] not in complete:
            continue
        if r.get("status") == "ok":
            table.setdefault(r["M"], {})[r["candidate"]] = (r["timing"]["median_us"], r["eval_s"])
        else:
            other += r.get("eval_s", 0.0)
    return header, table, other, len(complete - {"default"})


def _read_lines(path: Path) -> list[str]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text().splitlines()


def check_run(exhaustive: Path, run: Path) -> dict:
    """A real run's winners, looked up in the exhaustive journal: distance from its best."""
    _, table, _, _ = load(exhaustive)
    recs = [json.loads(line) for line in _read_lines(run)[1:] if line.strip()]
    winners = {r["M"]: r["winner"] for r in recs if r.get("kind") == "winner"}
    evaluated = [r for r in recs if "candidate" in r and r.get("status") != "pruned"]
    per_M = {}
    for M, key in sorted(winners.items()):
        best = min(t for t, _ in table[M].values())
        per_M[M] = table[M][key][0] / best - 1 if key in table[M] else None
    known = [d for d in per_M.values() if d is not None]
    stamps = [r["t"] for r in recs if "t" in r]
    return {"run": str(run), "per_M": per_M, "worst": max(known) if known else None,
            "evaluations": len(evaluated), "eval_s": sum(r.get("eval_s", 0) for r in evaluated),
            "journal_span_s": max(stamps) - min(stamps) if stamps else None}  # fmt: skip


def fast_keys(header: dict) -> set[str]:
    from moetune.platform import get_platform
    from moetune.problem import Problem
    from moetune.space import search_space

    p = header["problem"]
    problem = Problem(**{**p, "block_shape": tuple(p["block_shape"]) if p["block_shape"] else None})
    return {c.key() for c in search_space(get_platform(header["platform"]), problem, "fast")}


def outcome(table, chosen: dict[int, set[str]]) -> dict:
    """Distance from the best per batch size, evaluations and eval seconds of ``chosen`` pairs."""
    dist, evals, secs = {}, 0, 0.0
    for M, cands in table.items():
        best = min(t for t, _ in cands.values())
        picked = [cands[c] for c in chosen[M] if c in cands]
        evals += len(picked)
        secs += sum(s for _, s in picked)
        dist[M] = min(t for t, _ in picked) / best - 1 if picked else math.inf
    geomean = statistics.geometric_mean([1 + d for d in dist.values()]) - 1
    return {"worst": max(dist.values()), "geomean": geomean, "evals": evals, "eval_s": secs,
            "per_M": dist}  # fmt: skip


def halving(table, pool: set[str], keep: float, space_size: int) -> dict[int, set[str]]:
    """moetune's --strategy halving: ``keep`` is a fraction of the whole space (``space_size``
    candidates, also those that never pass), as in ``halving.survivors``."""
    Ms = sorted(table)
    anchors = sorted({Ms[0], Ms[len(Ms) // 2], Ms[-1]})
    n_keep = max(4, math.ceil(keep * space_size))
    survivors: set[str] = set()
    for M in anchors:
        ranked = sorted((t, c) for c, (t, _) in table[M].items() if c in pool)
        survivors.update(c for _, c in ranked[:n_keep])
    return {M: (pool if M in anchors else survivors) & set(table[M]) for M in Ms}


def random_pick(table, pool: set[str], n: int, seed: int) -> dict[int, set[str]]:
    rng = random.Random(seed)
    out = {}
    for M, cands in table.items():
        keys = sorted(set(cands) & pool)
        out[M] = set(rng.sample(keys, min(n, len(keys))))
    return out


def curve(path: Path) -> dict:
    header, table, other_s, n_space = load(path)
    full = set().union(*(set(c) for c in table.values()))
    fast_all = fast_keys(header)
    fast = fast_all & full
    rows = [
        dict(strategy="exhaustive-full", **outcome(table, {M: full for M in table})),
        dict(strategy="exhaustive-fast", **outcome(table, {M: fast for M in table})),
    ]
    for space, pool in (("full", full), ("fast", fast)):
        for k in KEEPS:
            size = n_space if space == "full" else len(fast_all)
            res = outcome(table, halving(table, pool, k, size))
            rows.append(dict(strategy=f"halving({k})-{space}", **res))
    for n in RANDOM_N:
        runs = [outcome(table, random_pick(table, full, n, seed)) for seed in range(20)]
        rows.append({"strategy": f"random({n})-full",
                     "worst": statistics.mean(r["worst"] for r in runs),
                     "geomean": statistics.mean(r["geomean"] for r in runs),
                     "evals": statistics.mean(r["evals"] for r in runs),
                     "eval_s": statistics.mean(r["eval_s"] for r in runs),
                     "per_M": {}})  # fmt: skip
    reach = {}
    for th in THRESHOLDS:
        ok = [r for r in rows if r["worst"] <= th]
        cheapest = min(ok, key=lambda r: r["eval_s"]) if ok else None
        reach[f"{th:.0%}"] = (
            {"strategy": cheapest["strategy"], "evals": cheapest["evals"],
             "minutes": cheapest["eval_s"] / 60} if cheapest else None
        )  # fmt: skip
    p = header["problem"]
    name = f"E={p['E']} N={p['N']} K={p['K']} top{p['topk']} {p['dtype']}" + (
        f" {p['quant']}" if p.get("quant") else ""
    )
    return {"journal": str(path), "problem": name, "gpu": header.get("gpu"), "rows": rows,
            "reach": reach, "batch_sizes": sorted(table), "full_candidates": len(full),
            "fast_candidates": len(fast), "failed_or_rejected_s": other_s}  # fmt: skip


def markdown(results: list[dict]) -> str:
    out = []
    for res in results:
        out.append(f"### {res['problem']} on {res['gpu']} ({len(res['batch_sizes'])} batch sizes, "
                   f"{res['full_candidates']} candidates)\n")  # fmt: skip
        out.append("| strategy | evaluations | GPU minutes | worst distance | geomean distance |")
        out.append("|---|---:|---:|---:|---:|")
        for r in res["rows"]:
            out.append(f"| {r['strategy']} | {r['evals']:.0f} | {r['eval_s'] / 60:.2f} | "
                       f"{r['worst']:.2%} | {r['geomean']:.2%} |")  # fmt: skip
        out.append("")
        out.append("| within | cheapest strategy | evaluations | GPU minutes |")
        out.append("|---|---|---:|---:|")
        for th, c in res["reach"].items():
            if c is None:
                out.append(f"| {th} | none replayed | | |")
            else:
                out.append(f"| {th} | {c['strategy']} | {c['evals']:.0f} | {c['minutes']:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journals", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--run", type=Path, help="a real run to check against the first journal")
    args = ap.parse_args(argv)
    if args.run:
        res = check_run(args.journals[0], args.run)
        print(json.dumps(res, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        return
    results = [curve(p) for p in args.journals]
    md = markdown(results)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.md:
        args.md.write_text(md + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
