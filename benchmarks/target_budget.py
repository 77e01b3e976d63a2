"""What a geomean target (issue 5's 1.10x the floor) asks of each band of batch sizes, from the
`moetune bench` JSON files of a ratio report.

It prints:
- the geomean time/floor over every usable point;
- each band's share of the distance to the target, in log units: the sum over the band's points
  of ln(ratio / target). The target is met when these sum to zero or less;
- the geomean if each band were brought down to a cap (points already below a cap keep their
  ratio):
  - M=1 at the floor plus a fixed latency (one launch's start and drain, in µs);
  - the middle points (8 <= M <= 512) at a ratio;
  - the compute-bound points (M >= 2048) at a ratio, e.g. the sustained share of the burst
    ceiling under the card's power cap (results/kernels/NOTES.md §21).

    python benchmarks/target_budget.py results/report-h100-2026-12-07/*.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
from report_table import geomean  # a script beside this one

TARGET = 1.10
BANDS = ("M=1", "8<=M<=512", "M>=2048")


class Point(NamedTuple):
    problem: str
    M: int
    ratio: float  # tuned time / floor
    floor_us: float


def band(M: int) -> str:
    return BANDS[0] if M == 1 else BANDS[2] if M >= 2048 else BANDS[1]


def points(paths: list[Path]) -> list[Point]:
    """The tuned rows of each bench file that have a time and a floor."""
    out = []
    for path in paths:
        bench = json.loads(path.read_text())
        p = bench["problem"]
        name = f"E{p['E']} N{p['N']} K{p['K']} top{p['topk']} {p.get('quant') or p['dtype']}"
        for r in bench["rows"]:
            tuned, floor = r.get("tuned") or {}, (r.get("floor") or {}).get("us")
            if tuned.get("ok") and tuned.get("us") and floor:
                out.append(Point(name, r["M"], tuned["us"] / floor, floor))
    return out


def shares(pts: list[Point], target: float = TARGET) -> dict[str, float]:
    """Each band's sum of ln(ratio / target)."""
    out = dict.fromkeys(BANDS, 0.0)
    for p in pts:
        out[band(p.M)] += math.log(p.ratio / target)
    return out


def what_if(pts: list[Point], m1_latency_us: float | None, mid: float | None,
            big: float | None) -> float:  # fmt: skip
    """The geomean with each band capped; None leaves a band as measured."""
    capped = []
    for p in pts:
        b = band(p.M)
        cap = None
        if b == BANDS[0] and m1_latency_us is not None:
            cap = (p.floor_us + m1_latency_us) / p.floor_us
        elif b == BANDS[1]:
            cap = mid
        elif b == BANDS[2]:
            cap = big
        capped.append(p.ratio if cap is None else min(p.ratio, cap))
    return geomean(capped)


def report(pts: list[Point], target: float = TARGET) -> str:
    def fmt(v: float | None, unit: str = "") -> str:
        return "as measured" if v is None else f"{v:g}{unit}"

    overall = geomean([p.ratio for p in pts])
    lines = [
        f"{len(pts)} points; geomean time/floor {overall:.3f}, target {target:.2f}.",
        "",
        "| band | points | geomean | sum of ln(ratio / target) |",
        "|---|---:|---:|---:|",
    ]
    sh = shares(pts, target)
    for b in BANDS:
        ratios = [p.ratio for p in pts if band(p.M) == b]
        if ratios:
            lines.append(f"| {b} | {len(ratios)} | {geomean(ratios):.3f} | {sh[b]:+.2f} |")
    lines.append(f"| all | {len(pts)} | {overall:.3f} | {sum(sh.values()):+.2f} |")
    lines += ["", "| M=1 at floor + | 8<=M<=512 at | M>=2048 at | geomean | target met |",
              "|---:|---:|---:|---:|:---:|"]  # fmt: skip
    for lat, mid, big in itertools.product((None, 3.0, 2.0), (None, 1.05, 1.0),
                                           (None, 1.30, 1.25, 1.17)):  # fmt: skip
        g = what_if(pts, lat, mid, big)
        lines.append(f"| {fmt(lat, ' µs')} | {fmt(mid)} | {fmt(big)} | {g:.3f} | "
                     f"{'yes' if g <= target else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="moetune bench JSON files")
    parser.add_argument("--target", type=float, default=TARGET)
    a = parser.parse_args()
    pts = points(a.files)
    if not pts:
        raise SystemExit("Error: no tuned point with a floor in these files")
    print(report(pts, a.target), end="")


if __name__ == "__main__":
    main()
