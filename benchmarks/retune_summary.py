"""The finalists of a re-tune sweep, fastest first, with the incumbent table's entry marked.

Usage: python benchmarks/retune_summary.py JOURNAL.jsonl[.gz] SWEEP_STDERR.txt
(the sweep's stderr names the incumbent table: ``incumbent table: PATH``).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(journal: Path, stderr: Path) -> list[str]:
    records = _lines(journal)[1:]  # line 1 is the header
    incumbent: dict[int, dict] = {}
    for line in stderr.read_text().splitlines():
        if line.startswith("incumbent table: "):
            table = json.loads(Path(line.removeprefix("incumbent table: ")).read_text())
            incumbent = {int(k): v for k, v in table.items() if k.isdigit()}
    out = []
    for M in sorted({r["M"] for r in records if "M" in r}):
        final = [r for r in records if r.get("M") == M and r.get("phase") == "final"
                 and r.get("status") == "ok"]  # fmt: skip
        final.sort(key=lambda r: r["timing"]["median_us"])
        held = [r for r in final if r["config"] == incumbent.get(M)]
        out.append(f"M={M}: {len(final)} finalists"
                   + (f", incumbent {held[0]['timing']['median_us']:.2f} µs" if held else
                      ", incumbent not among them"))  # fmt: skip
        for r in final[:5]:
            mark = "  <- incumbent" if r["config"] == incumbent.get(M) else ""
            out.append(f"  {r['candidate']:<48} {r['timing']['median_us']:8.2f} µs{mark}")
        for w in (r for r in records if r.get("kind") == "winner" and r.get("M") == M):
            out.append(f"  winner {w.get('winner')} {w['timing']['median_us']:.2f} µs")
    return out


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]), Path(sys.argv[2]))))
