"""The points a re-tune changed, as ``close_configs.py`` arguments: for each table's journals
(``gpu_decode_retune.sh`` names them MODEL-tpTP-QUANT-mBATCHES.jsonl[.gz]), every batch size
whose winner differs from the entry of the table in --tables (shipped first, winner second).

Usage: python benchmarks/retune_points.py JOURNALS [--tables configs]
Prints one line a table: ``NAME --model MODEL --tp TP [--quant Q] --point M:SHIPPED,NEW ...``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moetune.export import best_entries, journal_table
from moetune.space import Candidate
from moetune.tables import load_table

NAME = re.compile(r"(?P<model>.+)-tp(?P<tp>\d+)-(?P<quant>[^-]+)-m[\d-]+\.jsonl(\.gz)?")


def _key(config: dict) -> str:
    """The candidate name the journals use, which ``close_configs.parse`` reads back."""
    return Candidate.from_config(config).key()


def points(journals: Path, tables: Path) -> list[str]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(journals.glob("*.jsonl*")):
        m = NAME.fullmatch(path.name)
        if m:
            key = f"{m['model']}-tp{m['tp']}-{m['quant']}"
            groups.setdefault(key, []).append(path)
    lines = []
    for key, paths in groups.items():
        m = NAME.fullmatch(paths[0].name)
        shipped = load_table(journal_table(paths[0], tables)).entries
        _, best = best_entries(paths)
        pts = [f"--point {M}:{_key(shipped[M])},{_key(c)}"
               for M, c in best.items() if M in shipped and c != shipped[M]]  # fmt: skip
        if pts:
            quant = [] if m["quant"] in ("bf16", "fp8block") else ["--quant", m["quant"]]
            lines.append(" ".join([key, "--model", m["model"], "--tp", m["tp"], *quant, *pts]))
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journals", type=Path, help="folder of the re-tune's journals")
    ap.add_argument("--tables", type=Path, default=Path("configs"))
    a = ap.parse_args()
    print("\n".join(points(a.journals, a.tables)))
