"""Fault injection for tests of the sweep's robustness (a test-only hook; off unless set).

``MOETUNE_FAULTS`` holds a JSON object mapping candidate keys to a fault: ``compile`` and
``resources`` raise as a failed compilation would, ``nan``, ``wrong`` and ``unwritten`` corrupt
the op's output after it ran (the checker must reject them), ``hang`` never returns, ``crash``
kills the process, and ``torn`` kills a worker process in the middle of sending a result (half a
message on its pipe, as a worker killed while it reports leaves). Worker processes inherit the
variable, so every backend sees the same faults.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time

import torch

FAULTS_ENV = "MOETUNE_FAULTS"
KINDS = ("compile", "resources", "nan", "wrong", "unwritten", "hang", "crash", "torn")


@functools.lru_cache(maxsize=4)
def _parse(text: str) -> dict[str, str]:
    faults = json.loads(text)
    bad = {k: v for k, v in faults.items() if v not in KINDS}
    if bad:
        raise ValueError(f"{FAULTS_ENV}: unknown fault kinds {bad}; expected {KINDS}")
    return faults


def fault_for(key: str) -> str | None:
    text = os.environ.get(FAULTS_ENV)
    return _parse(text).get(key) if text and key else None


def before_run(key: str) -> None:
    fault = fault_for(key)
    if fault == "compile":
        raise RuntimeError("CompilationError: injected compile failure")
    if fault == "resources":
        from triton.runtime.errors import OutOfResources

        raise OutOfResources(1 << 20, 232448, "shared memory")
    if fault == "hang":
        time.sleep(10**6)
    if fault == "crash":
        os._exit(139)
    if fault == "torn":
        from moetune.workers import results_pipe

        pipe = results_pipe()
        if pipe is not None:  # a length header promising 1 MiB, then 7 bytes of it
            os.write(pipe.fileno(), struct.pack("!i", 1 << 20) + b"partial")
        os._exit(139)


def corrupt_output(key: str, out: torch.Tensor) -> None:
    fault = fault_for(key)
    if fault == "nan":
        out.view(-1)[out.numel() // 2] = float("nan")
    elif fault == "wrong":
        out.mul_(1.25)
    elif fault == "unwritten":
        out[out.shape[0] // 2] = float("nan")
