"""Where an earlier file goes instead of being written over: the first free ``.old`` name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def old_names(paths: Sequence[Path], sep: str = "") -> list[Path]:
    """``<name>.old`` for each of ``paths``, or ``.old<sep>1``, ``.old<sep>2``, ...: the first
    suffix under which none of them exists yet, so files kept together (a table and its
    sidecar, a result and its plot) keep one suffix."""
    n = 0
    while True:
        suffix = ".old" if n == 0 else f".old{sep}{n}"
        names = [p.with_name(p.name + suffix) for p in paths]
        if not any(q.exists() for q in names):
            return names
        n += 1


def move_aside(paths: Sequence[Path]) -> list[Path]:
    """Rename each of ``paths`` that exists to its :func:`old_names` name (one suffix for the
    group). Returns those names, in order, for the missing paths too."""
    targets = old_names(paths)
    for path, target in zip(paths, targets, strict=True):
        if path.exists():
            path.rename(target)
    return targets
