"""The points a re-tune changed, as ``close_configs.py`` arguments: for each table's journals
(``gpu_decode_retune.sh`` names them MODEL-tpTP-QUANT-mBATCHES.jsonl[.gz]), every batch size
whose winner differs from the entry of the table in --tables (shipped first, winner second).

Usage: python benchmarks/retune_points.py JOURNALS [--tables configs]
Prints one line a table: ``NAME --model MODEL --tp TP [--quant Q] --point M:SHIPPED,NEW ...``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from moetune.export import best_entries, header_problem
from moetune.journal import read_journal
from moetune.tables import load_table, table_filename

NAME = re.compile(r"(?P<model>.+)-tp(?P<tp>\d+)-(?P<quant>[^-]+)-m[\d-]+\.jsonl(\.gz)?")


def config_name(c: dict) -> str:
    """The candidate name ``close_configs.parse`` reads back (CUDA keys)."""
    return (f"M{c['BLOCK_SIZE_M']}-N{c['BLOCK_SIZE_N']}-K{c['BLOCK_SIZE_K']}"
            f"-G{c['GROUP_SIZE_M']}-w{c['num_warps']}-s{c['num_stages']}")  # fmt: skip


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
        header = read_journal(paths[0]).header
        p = header_problem(header, paths[0])
        name = table_filename(p.E, p.N, header["device_name"], p.table_dtype, p.block_shape,
                              per_channel_quant=p.per_channel)  # fmt: skip
        shipped = load_table(tables / name).entries
        _, best = best_entries(paths)
        pts = [f"--point {M}:{config_name(shipped[M])},{config_name(c)}"
               for M, c in best.items() if M in shipped and c != shipped[M]]  # fmt: skip
        if pts:
            quant = [] if m["quant"] in ("bf16", "fp8block") else ["--quant", m["quant"]]
            lines.append(" ".join([key, "--model", m["model"], "--tp", m["tp"], *quant, *pts]))
    return lines


if __name__ == "__main__":
    args = sys.argv[1:]
    tables = Path("configs")
    if "--tables" in args:
        i = args.index("--tables")
        tables = Path(args[i + 1])
        del args[i : i + 2]
    if len(args) != 1:
        raise SystemExit(__doc__)
    print("\n".join(points(Path(args[0]), tables)))
