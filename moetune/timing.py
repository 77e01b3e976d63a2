"""Timing the op: CUDA-graph replay after warm-up, rotating input sets, median with spread.

A graph holds ``calls`` launches of the op, each on the next of several input sets, so a small
problem is not timed from L2 and launch gaps shrink to what a serving engine's graphs see. Each
replay is timed with CUDA events; the per-call time is the replay time over ``calls``. Compile
time never counts: the first call happens before the capture. Without a GPU (the interpreter)
there are no graphs: the host clock times two plain calls (no warm-up: the interpreter compiles
nothing, and every caller has already run the op once to check it), and those times only say how
the interpreter behaves, never how a GPU would.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

INTERPRETER_SAMPLES = 2


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int
    method: str  # "cuda-graph" or "host-clock"

    def as_dict(self) -> dict:
        return {
            "median_us": round(self.median_us, 3),
            "p20_us": round(self.p20_us, 3),
            "p80_us": round(self.p80_us, 3),
            "samples": self.samples,
            "method": self.method,
        }


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def time_op(
    fn: Callable[[int], object],
    num_sets: int,
    *,
    device: torch.device | str,
    replays: int = 20,
    calls_per_graph: int | None = None,
    warmup: int = 2,
) -> Timing:
    """Time ``fn(i)``, which runs the op on input set ``i`` (0 ≤ i < num_sets)."""
    device = torch.device(device)
    if device.type != "cuda":  # Triton's interpreter: each call costs ~0.5 s even for tiny shapes
        samples = []
        for r in range(max(1, min(replays, INTERPRETER_SAMPLES))):
            t0 = time.perf_counter()
            fn(r % num_sets)
            samples.append((time.perf_counter() - t0) * 1e6)
        med, lo, hi = _quantiles(samples)
        return Timing(med, lo, hi, len(samples), "host-clock")

    calls = calls_per_graph or max(num_sets, 4)
    for i in range(num_sets):
        fn(i)  # compile and autotune-free warm-up outside the capture
    torch.cuda.synchronize(device)
    stream = side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for i in range(2):  # warm-up on the side stream, as capture requires
            fn(i % num_sets)
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph, pool=graph_pool(device), stream=stream):
            for i in range(calls):
                fn(i % num_sets)
    torch.cuda.synchronize(device)
    for _ in range(warmup):
        graph.replay()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(start, end, strict=True):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(start, end, strict=True)]
    del graph
    med, lo, hi = _quantiles(samples)
    return Timing(med, lo, hi, len(samples), "cuda-graph")


_POOLS: dict[torch.device, object] = {}
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` and ``cuda:0`` are one device: one pool and one stream for both."""
    if device.index is None:
        return torch.device(device.type, torch.cuda.current_device())
    return device


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device for the whole process. The caching allocator keeps blocks
    (and PyTorch a cuBLAS workspace) per stream, so a new stream for every capture would
    reserve memory that no later capture reuses."""
    device = _indexed(torch.device(device))
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def graph_pool(device: torch.device) -> object:
    """The id of one graph memory pool per device, kept alive for the whole process.

    Every capture of this process allocates in it. A pool named only by
    ``torch.cuda.graph_pool_handle()`` dies with the last graph that used it, and its segments
    stay reserved until the allocator empties its cache; a ``torch.cuda.MemPool`` holds the pool
    itself, so the blocks a deleted graph leaves are reused by the next capture. With it and one
    capture stream (:func:`side_stream`), 20 captures in a row reserved no more memory on an
    NVIDIA H200 (without: 73 MB → 744 MB; results/kernels/NOTES.md §11). Sharing is safe because
    captures run one after another and each graph is deleted before the next capture.

    The pool's segments stay reserved for the process (``empty_cache`` does not free them): the
    largest capture's working memory stays held. Not ``use_on_oom``: that would let ordinary
    tensors take blocks a live graph writes on replay.
    PyTorch without ``MemPool`` gets a plain handle.

    One pool did not make a pair cheaper with 4 processes at once: benchmarks/worker_contention.py
    drifted between 16.8 and 22.8 ms a pair at M=1 with either (results/full-space-0.6/).
    """
    device = _indexed(torch.device(device))
    if device not in _POOLS:
        if hasattr(torch.cuda, "MemPool"):
            with torch.cuda.device(device):
                _POOLS[device] = torch.cuda.MemPool()
        else:  # older PyTorch: a handle, reused only while a graph holds it
            _POOLS[device] = torch.cuda.graph_pool_handle()
    pool = _POOLS[device]
    return getattr(pool, "id", pool)


SET_MEMORY_BYTES = 16 * 2**30  # at most this much weight copies for rotation


def set_memory_budget(device: torch.device | str, share: float = 0.25) -> int:
    """Bytes of weight copies timing may hold: ``share`` of the device's free memory, at most
    SET_MEMORY_BYTES (and SET_MEMORY_BYTES off the GPU, where no copies are made)."""
    device = torch.device(device)
    if device.type != "cuda":
        return SET_MEMORY_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return min(SET_MEMORY_BYTES, int(free * share))


def timing_set_count(
    weight_bytes: int, num_experts: int, topk: int, l2: int, memory_bytes: int = SET_MEMORY_BYTES
) -> int:
    """Input sets (each with its own weights) to rotate through when timing.

    Counted from the weights one call at the smallest batch size touches (topk experts), not
    from all of them: Qwen3-30B-A3B's 8 experts at M=1 are 38 MB, which fit the H100's 50 MB L2
    although the whole set (604 MB) does not, and reusing one set put M=1 timings 15-20% below
    what cold weights give (two full-space runs disagreed that much on their M=1 winners). A
    served model runs other layers between two calls of one layer, so cold is the honest case.
    """
    if weight_bytes <= 0 or num_experts <= 0:
        return 1
    touched = weight_bytes * min(topk, num_experts) // num_experts
    return max(1, min(rotation_count(touched, l2), memory_bytes // weight_bytes))


def rotation_count(bytes_per_set: int, l2_bytes: int, cap: int = 8) -> int:
    """Enough input sets that one pass over them is at least 4× the L2 (at most ``cap``)."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(cap, -(-4 * l2_bytes // bytes_per_set)))


def l2_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))
