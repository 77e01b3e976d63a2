"""The sweep journal: one JSON line per (candidate, batch size), flushed as it is written.

The first line is a header with provenance and the sweep's identity (problem, space, GPU,
versions). A re-run of the same sweep reads the records back and skips the pairs they cover; a
journal of another identity is refused unless the user starts over. A torn last line (a kill in
the middle of a write) is ignored with a warning.
"""

from __future__ import annotations

import gzip
import json
import os
import platform as pyplatform
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

import moetune
from moetune.keep import old_names

# Fields of the header that must match for a journal to be resumed.
IDENTITY_KEYS = (
    "problem", "space_id", "device_name", "moetune", "triton", "interpreter", "skew", "fp8_accum",
    "gemms", "act_scales",
)  # fmt: skip
FSYNC_INTERVAL_S = 1.0
# Journals written before a key existed are read as having its default value.
IDENTITY_DEFAULTS = {"skew": "uniform", "gemms": "joint", "act_scales": "dynamic"}


# Settings a journal may be resumed with anew: each change is journaled as a "resumed" record, so
# the header plus those records say how the journal's records came to be.
RESUME_KEYS = ("batch_sizes", "strategy")


def resumed_settings(journal: Journal, header: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``header`` (:data:`RESUME_KEYS`) that differ from the journal's latest:
    its header's, updated by its "resumed" records. Empty for a fresh journal."""
    latest = {k: journal.header.get(k) for k in RESUME_KEYS}
    for r in journal.records:
        if r.get("kind") == "resumed":
            latest.update({k: r[k] for k in RESUME_KEYS if k in r})
    return {k: header[k] for k in RESUME_KEYS if k in header and header[k] != latest[k]}


def identity(header: dict[str, Any], key: str) -> Any:
    """A header's value for identity key ``key``, its default when an older journal lacks it."""
    return header.get(key, IDENTITY_DEFAULTS.get(key))


class JournalError(ValueError):
    pass


def triton_version() -> str:
    import triton  # after moetune.launch has chosen the interpreter or the compiler

    return triton.__version__


def provenance(device_name: str, interpreter: bool) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "moetune": moetune.__version__,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": pyplatform.python_version(),
        "host": pyplatform.node(),
        "device_name": device_name,
        "interpreter": interpreter,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available() and not interpreter:
        prov["gpu"] = torch.cuda.get_device_name()
        prov["cuda"] = torch.version.cuda
        prov["hip"] = torch.version.hip
    return prov


@dataclass
class Journal:
    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _fh: TextIO | None = None
    _synced: float = 0.0

    def done(self) -> set[tuple[str, int]]:
        return {(r["candidate"], r["M"]) for r in self.records if "candidate" in r}

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._fh.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        # flush() hands each record to the OS, which is all a killed process needs; fsync (for
        # a crash of the machine itself) at most once a second: with 4 GPUs reporting ~80
        # records/s, a sync per record kept the driver from handing out work.
        self._fh.flush()
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()
        self.records.append(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """A journal's lines; ``.gz`` journals (as results/ keeps them) are read compressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from enumerate(f, start=1)


def read_journal(path: str | os.PathLike[str]) -> Journal:
    """Load a journal; a malformed line other than a torn last one is a JournalError."""
    p = Path(path)
    try:
        lines = list(_lines(p))
    except (OSError, EOFError, zlib.error) as e:  # a cut or corrupted .gz file
        why = getattr(e, "strerror", None) or e
        raise JournalError(f"cannot read journal {p}: {why}") from None
    except UnicodeDecodeError:
        raise JournalError(f"{p} is not a moetune journal (not UTF-8 text)") from None
    if not lines:
        raise JournalError(f"journal {p} is empty")
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    for i, (lineno, line) in enumerate(lines):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                warnings.append(f"{p.name}: ignored a torn last line ({lineno})")
                continue
            if i == 0:
                raise JournalError(f"{p} is not a moetune journal (no header line)") from None
            raise JournalError(f"journal {p} line {lineno} is not a JSON object") from None
        if i == 0:
            if obj.get("kind") != "moetune-journal":
                raise JournalError(f"{p} is not a moetune journal (no header line)")
            header = obj
        else:
            records.append(obj)
    if header is None:  # the only line was torn
        raise JournalError(f"{p} is not a moetune journal (no complete header line)")
    return Journal(p, header, records, warnings)


def _set_aside(p: Path) -> None:
    """Move an old journal to a free ``<name>.old[.N]``; refuse to move anything else away."""
    try:
        with open(p, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        first = None
    if not isinstance(first, dict) or first.get("kind") != "moetune-journal":
        raise JournalError(f"{p} is not a moetune journal: --fresh will not replace it")
    p.replace(old_names([p], sep=".")[0])


def open_journal(path: str | os.PathLike[str], header: dict[str, Any], *, fresh: bool) -> Journal:
    """Start a journal, or resume one whose identity matches ``header``."""
    p = Path(path)
    if p.suffix == ".gz":
        raise JournalError(f"{p}: a sweep appends to a plain .jsonl journal; gzipped ones are "
                           "for export-configs to read")  # fmt: skip
    header = {"kind": "moetune-journal", **header}
    if p.exists() and p.stat().st_size > 0 and not fresh:
        old = read_journal(p)
        diffs = [k for k in IDENTITY_KEYS if identity(old.header, k) != identity(header, k)]
        if diffs:
            raise JournalError(
                f"{p} belongs to another sweep (different {', '.join(diffs)}); "
                "use --fresh to start over or --journal to choose another file"
            )
        if old.warnings:
            # Cut the torn tail so the next append starts on a fresh line.
            good = "".join(line for _, line in _lines(p) if line.endswith("\n"))
            p.write_text(good, encoding="utf-8")
        return old
    if p.exists() and fresh and p.stat().st_size > 0:
        _set_aside(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise JournalError(f"cannot write journal {p}: {e.strerror or e}") from None
    return Journal(p, header)
