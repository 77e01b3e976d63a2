"""The ratio report from `moetune bench` JSON files: per problem and batch size the default
config, the tuned table and the floor, then geomean and worst time/floor per problem next to a
reference figure (vLLM's, from the issue that set the 1.10x target, H100 80GB HBM3).

    python benchmarks/report_table.py results/report/*.json > results/report/REPORT.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Geomean time/floor of vLLM's kernel and tables on an H100 80GB HBM3, M in {1, 8, 32, 128, 512,
# 2048, 4096}, static fp8 activation scales: keyed by (E, N, K, topk, quantized).
VLLM = {
    (8, 7168, 4096, 2, False): ("Mixtral-8x7B TP2 bf16", 1.27),
    (8, 7168, 4096, 2, True): ("Mixtral-8x7B TP2 fp8_w8a8", 1.32),
    (128, 384, 2048, 8, False): ("Qwen3-30B-A3B TP2 bf16", 1.45),
    (128, 384, 2048, 8, True): ("Qwen3-30B-A3B TP2 fp8_w8a8", 1.86),
    (128, 2880, 2880, 4, False): ("gpt-oss-120b TP1 bf16", 1.13),
    (128, 2880, 2880, 4, True): ("gpt-oss-120b TP1 fp8_w8a8", 1.37),
}


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


REFERENCE_M = {1, 8, 32, 128, 512, 2048, 4096}


def label(bench: dict) -> tuple[str, float | None]:
    """The problem's name, and vLLM's figure when the run was made under its conditions
    (an H100, uniform routing, fp8_w8a8 with static scales or bf16, the seven batch sizes)."""
    p = bench["problem"]
    quant = p.get("quant")
    key = (p["E"], p["N"], p["K"], p["topk"], quant is not None)
    name, ref = VLLM.get(key, (None, None))
    if name is None or quant not in (None, "fp8_w8a8") or p.get("block_shape"):
        block = "x".join(map(str, p.get("block_shape") or []))
        what = f"{quant or p['dtype']}{f' block {block}' if block else ''}"
        name, ref = f"E{p['E']} N{p['N']} K{p['K']} top{p['topk']} {what}", None
    skew = bench.get("skew", "uniform")
    if skew != "uniform":
        name, ref = f"{name}, {skew} routing", None
    if quant is not None and not bench.get("static_scales"):
        name, ref = f"{name}, dynamic scales", None
    if {r["M"] for r in bench["rows"]} != REFERENCE_M:
        ref = None
    if "H100" not in str(bench.get("provenance", {}).get("gpu", "")):
        ref = None  # measured against an H100's floor: another card's ratios do not compare
    return name, ref


def _usable(row: dict) -> bool:
    """A row with default, tuned and floor (the naive loop may have failed: not needed here)."""
    return bool(row.get("default", {}).get("ok") and row.get("tuned", {}).get("ok")
                and (row.get("floor") or {}).get("us"))  # fmt: skip


def source(bench: dict) -> str:
    """What "tuned" ran: the table's file name, or "no table: default config"."""
    if bench.get("tuned_source") == "table" and bench.get("table"):
        return Path(bench["table"]).name
    return {"default": "no table: default config"}.get(bench.get("tuned_source"), "given configs")


def report(paths: list[Path]) -> str:
    """Markdown: one table per bench file, then the summary."""
    out, summary = [], []
    for path in paths:
        bench = json.loads(path.read_text())
        name, ref = label(bench)
        rows = [r for r in bench["rows"] if _usable(r)]
        if not rows:
            summary.append((name, None, None, None, ref, bench))
            continue
        scales = ", static activation scales" if bench.get("static_scales") else ""
        out.append(f"### {name} ({source(bench)}{scales})\n")
        out.append("| M | default µs | tuned µs | floor µs | tuned/floor | tuned vs default |")
        out.append("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            out.append(f"| {r['M']} | {r['default']['us']:,.1f} | {r['tuned']['us']:,.1f} | "
                       f"{r['floor']['us']:,.1f} | {r['tuned_over_floor']:.2f} | "
                       f"{r['speedup_vs_default']:.2f}× |")  # fmt: skip
        out.append("")
        ratios = [r["tuned_over_floor"] for r in rows]
        vs_default = geomean([r["speedup_vs_default"] for r in rows])
        summary.append((name, geomean(ratios), max(ratios), vs_default, ref, bench))
    out.append("### Summary: geomean time/floor\n")
    out.append("| problem | tuned/floor | worst | tuned vs default | vLLM (H100) | table |")
    out.append("|---|---:|---:|---:|---:|---|")
    for name, gm, worst, vs_default, ref, bench in summary:
        table = source(bench)
        if gm is None:
            out.append(f"| {name} | no passing row | | | {ref or ''} | {table} |")
            continue
        out.append(f"| {name} | {gm:.2f} | {worst:.2f} | {vs_default:.2f}× | "
                   f"{ref if ref is not None else ''} | {table} |")  # fmt: skip
    gms = [s[1] for s in summary if s[1] is not None]
    refs = [s[4] for s in summary if s[1] is not None and s[4] is not None]
    if gms:
        overall = f"\nOverall (geomean of the rows above): {geomean(gms):.2f}"
        if len(refs) == len(gms):
            overall += f"; vLLM {geomean(refs):.2f}"
        out.append(overall + ".")
    gpus = sorted({str(s[5].get("provenance", {}).get("gpu", "?")) for s in summary})
    out.append(f"GPU: {', '.join(gpus)}.")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="moetune bench JSON files")
    print(report(parser.parse_args().files), end="")


if __name__ == "__main__":
    main()
