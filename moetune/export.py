"""`moetune export-configs`: the fastest passing candidate per batch size → a vLLM-named table.

A split sweep (``--gemms split``) also gives a ``_down`` table for the down GEMM (SGLang's name
for it): the main table holds the up GEMM's winners (vLLM runs one config for both GEMMs, so
that is what vLLM reads), the ``_down`` table the down GEMM's winners, each one the config that
passed a check together with the main table's entry for its batch size.

``merge=True`` re-tunes some batch sizes of a table already in the destination: the journals'
batch sizes replace that table's entries there, and its other entries stay. The sidecar then
says which entries came from which sweep (``merged``), with the old sidecar kept inside it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.gemms import FINAL_PREFIX, committed, counts
from moetune.journal import Journal, identity, read_journal
from moetune.keep import move_aside, old_names
from moetune.problem import Problem
from moetune.tables import (
    TableError,
    gemm_suffix,
    load_table,
    sglang_filename,
    sglang_version_dir,
    sidecar_path,
    table_filename,
    write_table,
)


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    paths: list[Path]
    entries: dict[int, dict[str, Any]]
    device_name: str
    warnings: list[str] = field(default_factory=list)  # e.g. a torn last journal line ignored
    down_entries: dict[int, dict[str, Any]] | None = None  # the _down table's, when written
    changed: list[int] | None = None  # with merge: the batch sizes whose entry it changed


def header_problem(header: dict[str, Any], path: Path) -> Problem:
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
        # A re-checked winner outranks plain records; a split sweep's winners settled by timing
        # the pair together (moetune.pairs) outrank the per-GEMM winners they replace.
        rank = -1 if r.get("settled") else 0
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


def _failed_rechecks(journals) -> set[tuple[int, str]]:
    """(M, candidate) pairs whose re-check on fresh inputs failed: a finalist's own re-check, or
    a winner candidate the sweep turned down (``recheck-failed``)."""
    failed: set[tuple[int, str]] = set()
    for j in journals:
        for r in j.records:
            if r.get("kind") == "recheck-failed":
                failed.add((r.get("M"), str(r.get("failed"))))
            elif isinstance(r.get("recheck"), dict) and not r["recheck"].get("ok", False):
                failed.add((r.get("M"), str(r.get("candidate")).removeprefix(FINAL_PREFIX)))
    return failed


def best_entries(
    journal_paths: list[Path], warnings: list[str] | None = None, gemm: str | None = None
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Per batch size: the re-checked winner if the sweep finished, else the fastest ``ok``
    candidate that did not fail a re-check on fresh inputs.

    A first-pass record faster than the winner never displaces it: the winner's timing is the
    careful re-timing and it alone passed the re-check on fresh inputs. Several journals of the
    same problem and device combine (e.g. spaces swept separately); the fastest winner (else the
    fastest passing record) wins across all of them. The journals' warnings go to ``warnings``.
    ``gemm`` ("up" or "down") takes a split sweep's records for that GEMM; there a pair of
    winners settled by timing them together (:mod:`moetune.pairs`) outranks the per-GEMM
    winners, and counts only once its sweep committed it.
    """
    return _best_entries(_read_all(journal_paths), warnings, gemm)


def _read_all(journal_paths: list[Path]) -> list[tuple[Path, Journal]]:
    return [(path, read_journal(path)) for path in journal_paths]


def _best_entries(
    journals: list[tuple[Path, Journal]], warnings: list[str] | None, gemm: str | None
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    header: dict[str, Any] | None = None
    best: dict[int, tuple[float, int, dict[str, Any]]] = {}
    rejected = _failed_rechecks(j for _, j in journals)
    for path, j in journals:
        header_problem(j.header, path)
        done = committed(j.records)
        if warnings is not None:
            warnings.extend(j.warnings)
        if header is None:
            header = j.header
        else:
            for key in ("problem", "device_name", "interpreter", "gemms", "act_scales"):
                if identity(j.header, key) != identity(header, key):
                    raise ExportError(f"{path} is a sweep of another {key} than {journals[0][0]}")
        for line, r in enumerate(j.records, start=2):  # line 1 is the header
            if r.get("gemm") != gemm or not counts(r, done):
                continue  # another GEMM's, or a settled pair its sweep never committed
            ranked = _ranked(r, path, line)
            if ranked is None:
                continue
            M, cand = ranked
            name = str(r.get("candidate")).removeprefix(FINAL_PREFIX)
            if cand[1] == 1 and (M, name) in rejected:
                continue  # it failed a re-check on fresh inputs: never a table entry
            # A re-checked winner outranks every plain record; among equals the fastest wins.
            if M not in best or (cand[1], cand[0]) < (best[M][1], best[M][0]):
                best[M] = cand
    if header is None:
        raise ExportError("no journal given")
    if not best:
        raise ExportError("the journals hold no candidate that passed its check")
    return header, {M: best[M][2] for M in sorted(best)}


def _down_entries(
    journals: list[tuple[Path, Journal]], up: dict[int, dict[str, Any]], warnings: list[str]
) -> dict[int, dict[str, Any]] | None:
    """The down winners checked together with ``up``'s entry of their batch size (a committed
    settled pair's first, then the fastest when several journals have one); None, with a
    warning, unless every batch size has one."""
    best: dict[int, tuple[tuple[int, float], dict[str, Any]]] = {}
    for _, j in journals:
        done = committed(j.records)
        for r in j.records:
            if r.get("kind") != "winner" or r.get("gemm") != "down" or not counts(r, done):
                continue
            M, us = r.get("M"), (r.get("timing") or {}).get("median_us")
            checked = M in up and r.get("pair_up") == up[M] and isinstance(us, (int, float))
            rank = (0 if r.get("settled") else 1, us)  # settled pairs first (moetune.pairs)
            if checked and (M not in best or rank < best[M][0]):
                best[M] = (rank, r["config"])
    missing = sorted(set(up) - set(best))
    if missing:
        warnings.append(
            f"no _down table: no down winner checked with the up entry at M={missing} "
            "(an unfinished split sweep, or winners from other journals); re-run the sweep"
        )
        return None
    differ = [M for M in sorted(best) if best[M][1]["BLOCK_SIZE_M"] != up[M]["BLOCK_SIZE_M"]]
    if differ:
        warnings.append(
            f"_down table: BLOCK_SIZE_M differs from the main table's at M={differ}; moetune "
            "aligns each GEMM on its own, SGLang runs the down GEMM at the up GEMM's BLOCK_SIZE_M"
        )
    return {M: best[M][1] for M in sorted(best)}


def journal_table(journal: Path, folder: Path) -> Path:
    """Where ``export-configs`` puts the (main, vLLM-named) table of ``journal``'s problem and
    GPU in ``folder``."""
    header = read_journal(journal).header
    p = header_problem(header, journal)
    return folder / _names(p, header["device_name"], header["triton"], False, "up")[0]


def _names(p, device_name: str, triton: str, sglang: bool, gemm: str) -> list[str]:
    """The table's file names (vLLM's, and SGLang's in its Triton-version folder)."""
    names = [table_filename(p.E, p.N, device_name, p.table_dtype, p.block_shape,
                            suffix=gemm_suffix(gemm))]  # fmt: skip
    if sglang:
        sg = sglang_filename(p.E, p.N, device_name, p.table_dtype, p.block_shape,
                             per_channel_quant=p.per_channel, down=gemm == "down")  # fmt: skip
        names.append(f"{sglang_version_dir(triton)}/{sg}")
    return names


def check_options(*, sglang: bool, merge: bool, batch_sizes: list[int] | None) -> None:
    """ExportError for options :func:`export_configs` cannot take together (the CLI calls this
    before reading any journal)."""
    if merge and sglang:
        raise ExportError("--merge writes vLLM's table name only: merge, then export for SGLang "
                          "from all the journals, or copy the merged table")  # fmt: skip
    if batch_sizes is not None and not merge:
        raise ExportError("--batch-sizes goes with --merge: a table of some batch sizes would "
                          "replace the whole table in --out")  # fmt: skip


def export_configs(
    journal_paths: list[Path],
    out_dir: Path,
    *,
    device_name: str | None = None,
    sglang: bool = False,
    merge: bool = False,
    batch_sizes: list[int] | None = None,
) -> ExportResult:
    """Write the table (and its provenance sidecar) for the journals' problem and device; for a
    split sweep also the ``_down`` table; with ``merge``, into the table already there (see the
    module doc); ``batch_sizes``: only these of the journals' batch sizes."""
    check_options(sglang=sglang, merge=merge, batch_sizes=batch_sizes)
    warnings: list[str] = []
    journals = _read_all(journal_paths)  # once: every step below reads these
    split = bool(journals) and journals[0][1].header.get("gemms") == "split"
    header, entries = _best_entries(journals, warnings, "up" if split else None)
    if merge and split:
        raise ExportError("--merge takes joint sweeps only: a split sweep's _down table "
                          "pairs with every entry of its main table")  # fmt: skip
    if batch_sizes is not None:
        missing = sorted(set(batch_sizes) - set(entries))
        if missing:
            raise ExportError(f"the journals hold no passing candidate at M={missing}")
        entries = {M: entries[M] for M in sorted(set(batch_sizes))}
    down = _down_entries(journals, entries, warnings) if split else None
    for path, j in journals:  # a split sweep's pair choice that kept winners with a caveat
        for r in j.records:
            if r.get("kind") == "pair-choice" and r.get("warning"):
                warnings.append(f"{path}: M={r.get('M')}: {r['warning']}")
    recorded = header["device_name"]
    device_name = device_name or recorded
    if header.get("interpreter") and device_name != recorded:
        raise ExportError(
            f"refusing to write a table named for {device_name} from an interpreter run: "
            "interpreter timings say nothing about a GPU"
        )
    p = header_problem(header, journal_paths[0])
    per_gemm = {"up": entries, "down": down} if split else {"up": entries}
    try:
        tables = [(n, gemm, ents) for gemm, ents in per_gemm.items() if ents is not None
                  for n in _names(p, device_name, header["triton"], sglang, gemm)]  # fmt: skip
    except ValueError as e:
        raise ExportError(f"cannot name the table: {e}") from None
    sidecar = {
        "generated_by": "moetune export-configs",
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "journals": [str(j) for j in journal_paths],
        "sweep": {k: v for k, v in header.items() if k != "kind"},
    }
    resumed = [{k: v for k, v in r.items() if k != "kind"}
               for _, j in journals for r in j.records if r.get("kind") == "resumed"]  # fmt: skip
    if all("batch_sizes" in j.header for _, j in journals):  # of every journal, not the first's
        batches = {M for _, j in journals for M in j.header["batch_sizes"]}
        batches |= {M for r in resumed for M in r.get("batch_sizes") or []}
        sidecar["sweep"]["batch_sizes"] = sorted(batches)
    if resumed:  # a journal resumed with other settings than its header's
        sidecar["sweep"]["resumed"] = resumed
    if merge:
        for n in _names(p, device_name, header["triton"], sglang, "down"):
            if (out_dir / n).exists():
                raise ExportError(f"--merge: {out_dir / n} pairs with every entry of the table "
                                  "it sits beside; re-run its split sweep instead")  # fmt: skip
        tables = [(n, gemm, *_merge(out_dir / n, ents, sidecar, warnings))
                  for n, gemm, ents in tables]  # fmt: skip
    else:
        tables = [(n, gemm, ents, {**sidecar, "gemm": gemm} if split else sidecar)
                  for n, gemm, ents in tables]  # fmt: skip
    try:
        for n, *_ in tables:  # every folder first: a failure leaves no table half-exported
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
        # A table there with entries this export drops or changes is copied first, never lost.
        copies = [_copy_if_different(out_dir / n, ents) if side is not None else []
                  for n, _, ents, side in tables]  # fmt: skip
        paths = []
        for i, (n, _, ents, side) in enumerate(tables):
            try:
                paths.append(
                    write_table(out_dir / n, ents, triton_version=header["triton"], sidecar=side)
                    if side is not None else out_dir / n  # a merge that changes nothing
                )  # fmt: skip
            except BaseException as e:  # tables not yet replaced need no copy; written ones do
                for files in copies[i:]:
                    for c in files:
                        c.unlink(missing_ok=True)
                kept = [f"{out_dir / done} (the old one kept as {files[0].name})"
                        for (done, *_), files in zip(tables[:i], copies[:i], strict=True)
                        if files]  # fmt: skip
                if kept and isinstance(e, (OSError, TableError)):
                    raise ExportError(f"cannot write {out_dir / n}: {e}; already written: "
                                      f"{', '.join(kept)}") from None  # fmt: skip
                raise
        for (n, *_), files in zip(tables, copies, strict=True):
            if files:
                warnings.append(f"{out_dir / n} held another table: kept it as {files[0].name}")
        if down is None:  # (a merge has refused a table with a _down beside it)
            _remove_stale_down(out_dir, _names(p, device_name, header["triton"], sglang, "down"),
                               warnings)  # fmt: skip
    except OSError as e:
        raise ExportError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    if not merge:
        return ExportResult(paths, entries, device_name, warnings, down)
    side = tables[0][3]
    changed = side["merged"]["changed"] if side is not None else []
    return ExportResult(paths, tables[0][2], device_name, warnings, down, changed)


Entries = dict[int, dict[str, Any]]


def _merge(path: Path, new: Entries, sidecar: dict[str, Any],
           warnings: list[str]) -> tuple[Entries, dict[str, Any] | None]:  # fmt: skip
    """The entries of the table at ``path`` with ``new`` in place of its own at their batch
    sizes, and the sidecar that says so (None: nothing changes). The table's own sidecar must
    say it was tuned for the same problem on the same GPU."""
    try:
        old = load_table(path)
    except TableError as e:
        if not path.exists():
            raise ExportError(f"--merge: no table to merge into at {path}") from None
        raise ExportError(f"--merge: {e}") from None
    side = sidecar_path(path)
    try:
        previous = json.loads(side.read_text())
        before = previous["sweep"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"--merge: {path} needs its provenance sidecar to show what it was "
                          f"tuned for ({side}: {type(e).__name__})") from None  # fmt: skip
    now = sidecar["sweep"]
    if header_problem(before, side) != header_problem(now, side):
        raise ExportError(f"--merge: {path} was tuned for another problem than the journals' "
                          f"({side})")  # fmt: skip
    for key in ("device_name", "interpreter"):
        if identity(before, key) != identity(now, key):
            raise ExportError(f"--merge: {path} was tuned with another {key} than the journals "
                              f"({side})")  # fmt: skip
    if identity(before, "act_scales") != identity(now, "act_scales"):
        warnings.append(
            f"--merge: {path} was timed with {identity(before, 'act_scales')} "
            f"activation scales, the journals with {identity(now, 'act_scales')}"
        )
    changed = sorted(M for M in new if old.entries.get(M) != new[M])
    if not changed:
        warnings.append(f"--merge: the journals' entries are {path}'s own; left as it was")
        return dict(old.entries), None
    kept = sorted(set(old.entries) - set(new))
    if not kept:
        warnings.append(f"--merge: the journals cover every batch size of {path}; "
                        "nothing of it is kept")  # fmt: skip
    triton = now["triton"]
    if old.triton_version and old.triton_version != triton:
        warnings.append(f"--merge: {path} was written for Triton {old.triton_version}; its kept "
                        f"entries now sit in a table marked {triton}")  # fmt: skip
    merged = {M: old.entries[M] for M in kept} | dict(new)
    return {M: merged[M] for M in sorted(merged)}, {
        **sidecar,
        "merged": {"from_journals": sorted(new), "changed": changed, "kept": kept,
                   "previous_sidecar": previous},
    }  # fmt: skip


def _remove_stale_down(out_dir: Path, names: list[str], warnings: list[str]) -> None:
    """A ``_down`` table left from an earlier export would pair its configs with main-table
    entries it was never checked with: the runtime must fall back to the main table instead."""
    for n in names:
        path = out_dir / n
        if path.exists():
            kept = keep_aside(path)
            warnings.append(f"moved {path} to {kept.name}: it was not exported with this main "
                            "table, so the runtime must not read it")  # fmt: skip


def keep_aside(path: Path) -> Path:
    """Rename the table at ``path`` (and its sidecar) to the first free ``<name>.old``,
    ``<name>.old1``, ...: no name a reader looks up, nothing lost. Returns the new path."""
    return move_aside([path, sidecar_path(path)])[0]


def _copy_if_different(path: Path, entries: Entries) -> list[Path]:
    """Before an export over an existing table with other entries: copy it (and its sidecar) to
    ``<name>.old`` (see :func:`keep_aside`), so the atomic write that replaces it loses nothing.
    A table whose every entry the new one holds unchanged (a re-export, a resumed sweep that
    added batch sizes) needs no copy. Returns the copies, the table's first."""
    if not path.is_file():
        return []
    try:
        new = {M: dict(c) for M, c in entries.items()}
        kept = all(new.get(M) == c for M, c in load_table(path).entries.items())
    except TableError:
        kept = False
    if kept:  # every entry it had is in the new table unchanged (a resume that added some)
        return []
    target, side_target = old_names([path, sidecar_path(path)])
    shutil.copy2(path, target)
    copies = [target]
    if sidecar_path(path).is_file():
        shutil.copy2(sidecar_path(path), side_target)
        copies.append(side_target)
    return copies
