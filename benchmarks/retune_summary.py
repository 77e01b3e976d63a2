"""The finalists of a re-tune sweep, fastest first, with the incumbent table's entry marked.

Usage: python benchmarks/retune_summary.py JOURNAL.jsonl[.gz]... [--tables configs]
(the incumbent is the table under --tables for the journal's problem and device, as the sweep's
``--incumbent auto`` found it when the tables are the ones it ran with).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moetune.export import journal_table
from moetune.journal import read_journal
from moetune.tables import load_table


def summary(journal: Path, tables: Path) -> list[str]:
    records = read_journal(journal).records
    table = journal_table(journal, tables)
    incumbent = load_table(table).entries if table.exists() else {}
    out = [f"{journal.name}: incumbent {table.name if incumbent else 'none'}"]
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journals", nargs="+", type=Path)
    ap.add_argument("--tables", type=Path, default=Path("configs"))
    a = ap.parse_args()
    for path in a.journals:
        print("\n".join(summary(path, a.tables)))
