"""Starting a sweep's worker and compile processes without an import of torch in each.

Started with "spawn", each helper process imports torch, Triton and moetune before it does
anything: 3.2 s for torch alone on an H100 host, and workers were ready only after 7.7 s on 4x
H100 while 28 compile processes imported the same files (results/full-space-0.3/). On a GPU
machine the sweep command instead starts a fork server first thing: it imports those modules
once, while the sweep's own process starts, and each helper is then forked from it ready to
work. The server never initialises CUDA (its one question, whether CUDA is available, is
answered through NVML), which is what makes forking it safe: PyTorch's own DataLoader forks
after importing torch the same way. NVIDIA only. A child takes the sweep's environment as it
is when the child is started (CUDA_VISIBLE_DEVICES above all), as a spawned one would.

Library callers and tests get "spawn" unless they call ``prestart`` first.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PRELOAD = [
    "torch",
    "triton",
    "moetune.evaluate",
    "moetune.inputs",
    "moetune.launch",
    "moetune.ops",
    "moetune.precompile",
    "moetune.workers",
]
# NVIDIA only: on AMD torch's fork-safe availability check is not known to hold (not run on AMD
# hardware), so ROCm machines keep "spawn".
_GPU_NODES = ("/dev/nvidiactl",)
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
_started = False


def gpu_machine() -> bool:
    """Whether this looks like a machine with an NVIDIA GPU, decided without importing torch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return any(Path(node).exists() for node in _GPU_NODES)


def prestart(preload: list[str] | None = None) -> bool:
    """Start the fork server now, importing ``preload`` (default PRELOAD) in the background,
    and have ``context`` hand it out from here on. Linux only; returns whether it started."""
    global _started
    if _started:
        return True
    if not sys.platform.startswith("linux"):
        return False
    from multiprocessing import forkserver

    saved = os.environ.get(_NVML_CHECK)
    # Importing moetune asks torch.cuda.is_available() (moetune._interpret); its default
    # answer initialises the CUDA driver, after which no forked child could use CUDA. The
    # NVML-based answer is fork-safe; the server alone starts with it (children get ``with_env``).
    os.environ[_NVML_CHECK] = "1"
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD if preload is None else preload)
        forkserver.ensure_running()  # returns at once; the server imports, then serves
    except (OSError, ValueError):
        return False
    finally:
        if saved is None:
            os.environ.pop(_NVML_CHECK, None)
        else:
            os.environ[_NVML_CHECK] = saved
    _started = True
    return True


def forking() -> bool:
    """Whether helpers are forked from the fork server (``prestart`` ran)."""
    return _started


def context() -> Any:
    """The multiprocessing context for helper processes: the fork server once ``prestart``
    ran, else "spawn" (never plain fork: the sweep's own process holds a CUDA context)."""
    return mp.get_context("forkserver" if _started else "spawn")


_starting = 0  # helper processes in the middle of ``start_helper``
_deferred: BaseException | None = None


def start_helper(proc: Any) -> None:
    """``proc.start()`` with a stop signal held back until the child has its start-up data.
    Raised in between, the signal closes the pipe the child reads that data from, and the child
    dies with a traceback on the sweep's stderr; held, it is raised as soon as the start ends."""
    global _starting, _deferred
    _starting += 1
    try:
        proc.start()
    finally:
        _starting -= 1
        if _starting == 0 and _deferred is not None:
            exc, _deferred = _deferred, None
            raise exc


def defer_while_starting(exc: BaseException) -> bool:
    """For a signal handler: keep ``exc`` for :func:`start_helper` to raise once the helper it is
    starting has started; False (nothing kept) when no helper is being started."""
    global _deferred
    if _starting:
        _deferred = exc
        return True
    return False


def with_env(env: dict[str, str], target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` under ``env``: a forked child would otherwise keep the fork
    server's environment from when it started, not the sweep's at the child's start."""
    os.environ.clear()
    os.environ.update(env)
    return target(*args)


# What reading a helper's pipe raises once the helper has exited, or died in the middle of a
# message (a length header with too few bytes behind it, a truncated pickle).
_BROKEN = (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
           ImportError, IndexError, MemoryError)  # fmt: skip


def messages(pipes: list[Any], timeout: float) -> Iterator[tuple[Any, Any]]:
    """``(pipe, message)`` for every message waiting on ``pipes`` (read ends of one-way pipes,
    one per helper process), waiting up to ``timeout`` s for the first. A pipe that broke is
    closed after its last whole message and yielded once with message None, so the caller can
    drop it: a helper that dies can cost only its own pipe, never another's messages."""
    for conn in mp.connection.wait(pipes, timeout=timeout) if pipes else []:
        try:
            while conn.poll():
                msg = conn.recv()
                yield conn, msg
        except _BROKEN:
            conn.close()
            yield conn, None


def keep_to_self(pipe: Any) -> None:
    """Keep a helper's end of its pipe out of any process the helper starts: a grandchild
    holding it would keep the pipe open after the helper died, and the driver waiting for the
    rest of a torn message would wait for the grandchild."""
    if isinstance(pipe, mp.connection.Connection):  # (tests pass other sinks)
        os.set_inheritable(pipe.fileno(), False)
