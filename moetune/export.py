"""`moetune export-configs`: the fastest passing candidate per batch size → a vLLM-named table."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.journal import read_journal
from moetune.tables import sglang_filename, sglang_version_dir, table_filename, write_table


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    paths: list[Path]
    entries: dict[int, dict[str, Any]]
    device_name: str


def best_entries(journal_paths: list[Path]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Per batch size: the re-checked winner if the sweep finished, else the fastest ``ok``.

    Several journals of the same problem and device combine (e.g. spaces swept separately); the
    fastest passing record wins across all of them.
    """
    header: dict[str, Any] | None = None
    best: dict[int, tuple[float, int, dict[str, Any]]] = {}
    for path in journal_paths:
        j = read_journal(path)
        if header is None:
            header = j.header
        else:
            for key in ("problem", "device_name", "interpreter"):
                if j.header.get(key) != header.get(key):
                    raise ExportError(f"{path} is a sweep of another {key} than {journal_paths[0]}")
        for r in j.records:
            if r.get("kind") == "winner":
                # A re-checked winner outranks plain records of equal speed.
                cand = (r["timing"]["median_us"], 0, r["config"])
            elif r.get("status") == "ok" and r.get("candidate") != "default":
                cand = (r["timing"]["median_us"], 1, r["config"])
            else:
                continue
            M = r["M"]
            if M not in best or cand[:2] < best[M][:2]:
                best[M] = cand
    if header is None:
        raise ExportError("no journal given")
    if not best:
        raise ExportError("the journals hold no candidate that passed its check")
    return header, {M: best[M][2] for M in sorted(best)}


def export_configs(
    journal_paths: list[Path],
    out_dir: Path,
    *,
    device_name: str | None = None,
    sglang: bool = False,
) -> ExportResult:
    """Write the table (and its provenance sidecar) for the journals' problem and device."""
    header, entries = best_entries(journal_paths)
    recorded = header["device_name"]
    device_name = device_name or recorded
    if header.get("interpreter") and device_name != recorded:
        raise ExportError(
            f"refusing to write a table named for {device_name} from an interpreter run: "
            "interpreter timings say nothing about a GPU"
        )
    p = header["problem"]
    dtype = p["quant"] or ("float32" if p["dtype"] == "float32" else None)
    block = tuple(p["block_shape"]) if p.get("block_shape") else None
    names = [table_filename(p["E"], p["N"], device_name, dtype, block)]
    if sglang:  # SGLang keeps its tables in a folder per Triton version
        sg = sglang_filename(
            p["E"], p["N"], device_name, dtype, block, per_channel_quant=p.get("per_channel", False)
        )
        names.append(f"{sglang_version_dir(header['triton'])}/{sg}")
    sidecar = {
        "generated_by": "moetune export-configs",
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "journals": [str(j) for j in journal_paths],
        "sweep": {k: v for k, v in header.items() if k != "kind"},
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [
            write_table(out_dir / n, entries, triton_version=header["triton"], sidecar=sidecar)
            for n in names
        ]
    except OSError as e:
        raise ExportError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    return ExportResult(paths, entries, device_name)
