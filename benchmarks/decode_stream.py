"""How fast one launch can read N bytes: the floor a decode GEMM launch can actually approach.

At M=1 each GEMM launch of the op measured 2.7-6.5 µs beyond its weight bytes at the card's
bandwidth (results/kernels/NOTES.md §20). Part of that is any kernel's: CTAs start, the first
bytes come from DRAM, the last CTA drains. This times a plain Triton read (each program sums
CHUNK contiguous bytes, 16 per thread per load, and stores one value) of the same sizes, from
memory the previous calls did not touch (cold in L2), with a few CHUNK and warp settings, and
reports the best per size beside bytes / bandwidth. The kernel durations come from the profiler,
as ``kernel_breakdown.py`` reports the GEMMs'.

Usage: python benchmarks/decode_stream.py OUT.json [--mb 2,4.1,6.3,8.3,12.6,16.5,25,50,100]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from moetune.roofline import measure_ceilings

POOL_BYTES = 1 << 30  # reads rotate through 1 GiB, so each call's bytes are cold in L2
CALLS = 24


@triton.jit
def _read_kernel(src, out, n_words, CHUNK_WORDS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK_WORDS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for off in tl.range(0, CHUNK_WORDS, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        acc += tl.load(src + idx, mask=idx < n_words, other=0)
    tl.store(out + pid, tl.sum(acc, 0))


_calls = 0  # every read starts where the last one ended, across settings and sizes


def time_read(pool: torch.Tensor, nbytes: int, chunk: int, warps: int) -> float:
    """Median profiler duration (µs) of reading ``nbytes`` from rotating offsets of ``pool``."""
    global _calls
    words = nbytes // 4
    chunk_words = chunk // 4
    block = warps * 32 * 4  # 16 bytes a thread a load
    grid = triton.cdiv(words, chunk_words)
    out = torch.empty(grid, dtype=torch.int32, device=pool.device)
    slots = max(2, pool.numel() // words)

    def run(i: int) -> None:
        src = pool[(i % slots) * words :][:words]
        _read_kernel[(grid,)](src, out, words, CHUNK_WORDS=chunk_words, BLOCK=block,
                              num_warps=warps)  # fmt: skip

    for _ in range(3):
        run(_calls)
        _calls += 1
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run(_calls)
            _calls += 1
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    times = [ev.time_range.elapsed_us() for ev in prof.events()
             if ev.device_type == cuda and "_read_kernel" in ev.name]  # fmt: skip
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mb", default="2,4.1,6.3,8.3,12.6,16.5,25,50,100")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("Error: decode_stream.py needs a GPU")
    ceilings = measure_ceilings("cuda")
    bw = ceilings.read_Bps
    pool = torch.randint(0, 7, (POOL_BYTES // 4,), dtype=torch.int32, device="cuda")
    rows = []
    print(f"{torch.cuda.get_device_name()}: read ceiling {bw / 1e9:.0f} GB/s", flush=True)
    for mb in (float(x) for x in a.mb.split(",")):
        nbytes = int(mb * 1e6) // 16 * 16
        tried = {}
        for chunk in (16 << 10, 32 << 10, 64 << 10, 128 << 10):
            for warps in (4, 8):
                tried[f"chunk{chunk >> 10}K-w{warps}"] = time_read(pool, nbytes, chunk, warps)
        best = min(tried, key=tried.get)
        floor = nbytes / bw * 1e6
        rows.append({"mb": mb, "bytes": nbytes, "floor_us": floor, "best": best,
                     "best_us": tried[best], "tried_us": tried})  # fmt: skip
        print(
            f"{mb:7.1f} MB: best {tried[best]:7.2f} µs ({best}), floor {floor:7.2f} µs, "
            f"excess {tried[best] - floor:5.2f} µs, ratio {tried[best] / floor:.2f}",
            flush=True,
        )
    with open(a.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "ceilings": str(ceilings), "rows": rows},
                  f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
