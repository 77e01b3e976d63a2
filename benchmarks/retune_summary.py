"""The finalists of a re-tune sweep, fastest first, with the incumbent table's entry marked.

Usage: python benchmarks/retune_summary.py JOURNAL.jsonl[.gz]... [--tables configs]
(the incumbent is the table under --tables for the journal's problem and device, as the sweep's
``--incumbent auto`` found it when the tables are the ones it ran with).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from moetune.export import header_problem
from moetune.tables import load_table, table_filename


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(journal: Path, tables: Path) -> list[str]:
    header, *records = _lines(journal)
    problem = header_problem(header, journal)
    name = table_filename(problem.E, problem.N, header["device_name"], problem.table_dtype,
                          problem.block_shape, per_channel_quant=problem.per_channel)  # fmt: skip
    incumbent = load_table(tables / name).entries if (tables / name).exists() else {}
    out = [f"{journal.name}: incumbent {name if incumbent else 'none'}"]
    for M in sorted({r["M"] for r in records if "M" in r}):
        final = [r for r in records if r.get("M") == M and r.get("phase") == "final"
                 and r.get("status") == "ok"]  # fmt: skip
        final.sort(key=lambda r: r["timing"]["median_us"])
        held = [r for r in final if r["config"] == incumbent.get(M)]
        line = f"M={M}: {len(final)} finalists, "
        if held and final:
            us, best = held[0]["timing"]["median_us"], final[0]["timing"]["median_us"]
            line += f"incumbent {us:.2f} µs, best {best:.2f} µs ({us / best - 1:+.1%} faster)"
        else:
            line += "incumbent not among them"
        out.append(line)
        for r in final[:3]:
            mark = "  <- incumbent" if r["config"] == incumbent.get(M) else ""
            out.append(f"  {r['candidate']:<48} {r['timing']['median_us']:8.2f} µs{mark}")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    tables = Path("configs")
    if "--tables" in args:
        i = args.index("--tables")
        tables = Path(args[i + 1])
        del args[i : i + 2]
    for path in args:
        print("\n".join(summary(Path(path), tables)))
