"""`moetune export-configs`: the fastest passing candidate per batch size → a vLLM-named table."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.journal import read_journal
from moetune.problem import Problem
from moetune.tables import sglang_filename, sglang_version_dir, table_filename, write_table


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    paths: list[Path]
    entries: dict[int, dict[str, Any]]
    device_name: str
    warnings: list[str] = field(default_factory=list)  # e.g. a torn last journal line ignored


def _header_problem(header: dict[str, Any], path: Path) -> Problem:
    """The header's problem, validated: a hand-edited or foreign header fails here, by name."""
    p = header.get("problem")
    bad = [] if isinstance(p, dict) else ["problem"]
    bad += [k for k in ("device_name", "triton") if not isinstance(header.get(k), str)]
    if bad:
        raise ExportError(f"{path}: journal header lacks a valid {', '.join(bad)}")
    try:
        block = p.get("block_shape")
        return Problem(**{**p, "block_shape": tuple(block) if block else None})
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: journal header has a bad problem: {e}") from None


def _ranked(r: dict[str, Any], path: Path, line: int) -> tuple[int, tuple] | None:
    """``(M, (median_us, rank, config))`` of a passing record, None for any other record."""
    if r.get("kind") == "winner":
        rank = 0  # a re-checked winner outranks plain records
    elif r.get("status") == "ok" and r.get("candidate") != "default":
        rank = 1
    else:
        return None
    M, config, timing = r.get("M"), r.get("config"), r.get("timing")
    median = timing.get("median_us") if isinstance(timing, dict) else None
    if (
        not isinstance(M, int) or isinstance(M, bool) or M < 1
        or not isinstance(config, dict)
        or not isinstance(median, (int, float)) or isinstance(median, bool)
        or not math.isfinite(median)
    ):  # fmt: skip
        raise ExportError(
            f"{path} line {line}: a passing record without a valid M, config or timing"
        )
    return M, (float(median), rank, config)


def best_entries(
    journal_paths: list[Path], warnings: list[str] | None = None
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Per batch size: the re-checked winner if the sweep finished, else the fastest ``ok``.

    A first-pass record faster than the winner never displaces it: the winner's timing is the
    careful re-timing and it alone passed the re-check on fresh inputs. Several journals of the
    same problem and device combine (e.g. spaces swept separately); the fastest winner (else the
    fastest passing record) wins across all of them. The journals' warnings go to ``warnings``.
    """
    header: dict[str, Any] | None = None
    best: dict[int, tuple[float, int, dict[str, Any]]] = {}
    for path in journal_paths:
        j = read_journal(path)
        _header_problem(j.header, path)
        if warnings is not None:
            warnings.extend(j.warnings)
        if header is None:
            header = j.header
        else:
            for key in ("problem", "device_name", "interpreter"):
                if j.header.get(key) != header.get(key):
                    raise ExportError(f"{path} is a sweep of another {key} than {journal_paths[0]}")
        for line, r in enumerate(j.records, start=2):  # line 1 is the header
            ranked = _ranked(r, path, line)
            if ranked is None:
                continue
            M, cand = ranked
            # A re-checked winner outranks every plain record; among equals the fastest wins.
            if M not in best or (cand[1], cand[0]) < (best[M][1], best[M][0]):
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
    warnings: list[str] = []
    header, entries = best_entries(journal_paths, warnings)
    recorded = header["device_name"]
    device_name = device_name or recorded
    if header.get("interpreter") and device_name != recorded:
        raise ExportError(
            f"refusing to write a table named for {device_name} from an interpreter run: "
            "interpreter timings say nothing about a GPU"
        )
    p = _header_problem(header, journal_paths[0])
    try:
        names = [table_filename(p.E, p.N, device_name, p.table_dtype, p.block_shape)]
        if sglang:  # SGLang keeps its tables in a folder per Triton version
            sg = sglang_filename(p.E, p.N, device_name, p.table_dtype, p.block_shape,
                                 per_channel_quant=p.per_channel)  # fmt: skip
            names.append(f"{sglang_version_dir(header['triton'])}/{sg}")
    except ValueError as e:
        raise ExportError(f"cannot name the table: {e}") from None
    sidecar = {
        "generated_by": "moetune export-configs",
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "journals": [str(j) for j in journal_paths],
        "sweep": {k: v for k, v in header.items() if k != "kind"},
    }
    try:
        for n in names:  # every folder first: a failure then leaves no table half-exported
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
        paths = [
            write_table(out_dir / n, entries, triton_version=header["triton"], sidecar=sidecar)
            for n in names
        ]
    except OSError as e:
        raise ExportError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    return ExportResult(paths, entries, device_name, warnings)
