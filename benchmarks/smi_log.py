"""SM clock and board power from ``nvidia-smi``, sampled in the background while a benchmark
runs (``close_configs.py``, ``sustained_peak.py``)."""

from __future__ import annotations

import subprocess
import time


def start(period_ms: int = 100) -> subprocess.Popen:
    """Start sampling every ``period_ms``; hand the result to :func:`samples` to stop it."""
    return subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw",
         "--format=csv,noheader,nounits", "-lms", str(period_ms)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def samples(log: subprocess.Popen) -> list[tuple[float, float, float]]:
    """Stop the log; (unix time, SM MHz, W) per line. Its timestamps are local time, as
    ``time.mktime`` reads them. ``power.draw`` is the driver's average over its own window
    (one second on recent H100 drivers), so it lags the clock."""
    log.terminate()
    out = []
    for line in log.communicate()[0].splitlines():
        parts = line.split(", ")
        if len(parts) != 3:
            continue
        stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
        frac = float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
        out.append((stamp + frac, float(parts[1]), float(parts[2])))
    return out
