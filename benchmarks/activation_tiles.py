"""The activation + static fp8 launch's tile, timed at the shapes the op gives it.

At static-fp8 prefill sizes the op runs the activation and its fp8 re-quantization as a launch of
its own between the GEMMs (results/kernels/NOTES.md §13). On an H100 it took 112 µs for
Mixtral-8x7B at M=4096 and 120 µs for gpt-oss-120b, about half the copy bandwidth for the bytes
it moves. Its tile was one row of up to 1,024 columns, 4 warps, gpt-oss's interleaved (gate, up)
pairs in two strided loads. Here every tile of ``TILES`` (rows × columns a program, warps, and
for swiglu the paired load) is checked against the default tile's bits, then timed in CUDA
graphs (no host launch time: the op runs in one) at each shape, beside the time its bytes take
at the measured copy bandwidth. Calls cycle through copies of the input of at least
ROTATE_BYTES in all (three times an H100's or H200's 50 MB of L2), so the smaller shapes are not
timed from L2. The JSON is rewritten after each shape, so a run cut short keeps the shapes it
finished.

Usage: python benchmarks/activation_tiles.py OUT.json [--reps 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics

import torch

from moetune import activation
from moetune.activation import Tile, apply_activation_quantized
from moetune.roofline import measure_ceilings

# (label, slots T = M·topk, n, activation): the op's fp8 points above 64 tokens.
SHAPES = [
    ("Mixtral M=512", 1024, 3584, "silu"),
    ("Mixtral M=2048", 4096, 3584, "silu"),
    ("Mixtral M=4096", 8192, 3584, "silu"),
    ("Qwen3 M=128", 1024, 384, "silu"),
    ("Qwen3 M=512", 4096, 384, "silu"),
    ("Qwen3 M=2048", 16384, 384, "silu"),
    ("Qwen3 M=4096", 32768, 384, "silu"),
    ("gpt-oss M=512", 2048, 2880, "swigluoai"),
    ("gpt-oss M=2048", 8192, 2880, "swigluoai"),
    ("gpt-oss M=4096", 16384, 2880, "swigluoai"),
]
TILES = [
    Tile(rows, block, warps, pair)
    for rows, block, warps, pair in itertools.product(
        (1, 2, 4, 8), (256, 512, 1024), (4, 8), (False, True)
    )
]


DEVICE = "cuda"
ROTATE_BYTES = 150e6
MIN_CALLS = 8  # calls in a timed graph, at least


def time_us(fn, inputs: list, reps: int) -> float:
    """Median µs of one call ``fn(x)``: a CUDA graph of one call per input of ``inputs`` (so no
    host launch time, and the inputs cycle past L2) replayed ``reps`` times, each replay timed
    with CUDA events and divided by the calls in it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs[:2]:
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            fn(x)
    graph.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(inputs))
    return statistics.median(ts)


def write(path: str, rows: list, ceilings, ranked: list) -> None:
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "ceilings": str(ceilings),
                   "rows": rows, "one_tile_geomean_vs_best": ranked}, f, indent=1)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=40)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("Error: activation_tiles.py needs a GPU")
    ceilings = measure_ceilings(DEVICE)
    bw = ceilings.copy_Bps or ceilings.bandwidth_Bps  # a copy: the kernel reads and writes
    print(f"{torch.cuda.get_device_name()}; ceilings: {ceilings}", flush=True)
    fp8 = torch.float8_e4m3fn
    default = activation.TILE
    rows = []
    for label, T, n, act in SHAPES:
        x = torch.randn(T, 2 * n, device=DEVICE).to(torch.bfloat16) * 4
        copies = max(MIN_CALLS, math.ceil(ROTATE_BYTES / (x.numel() * x.element_size())))
        inputs = [x] + [x.clone() for _ in range(copies - 1)]
        scale = torch.tensor([0.02], device=DEVICE)
        want = apply_activation_quantized(x, act, fp8, scale, tile=default)[0].view(torch.uint8)
        moved = x.numel() * 2 + T * n  # bf16 in, fp8 out
        row = {"shape": label, "T": T, "n": n, "activation": act, "bytes": moved, "tiles": {}}
        for t in TILES:
            if t.pair_load and act != "swigluoai":  # silu: the same kernel as the unpaired tile
                row["tiles"][str(tuple(t))] = row["tiles"][str(tuple(t._replace(pair_load=False)))]
                continue
            got = apply_activation_quantized(x, act, fp8, scale, tile=t)[0].view(torch.uint8)
            if not torch.equal(got, want):
                row["tiles"][str(tuple(t))] = "different bits"
                continue

            def call(xi, t=t, act=act, scale=scale):
                return apply_activation_quantized(xi, act, fp8, scale, tile=t)

            row["tiles"][str(tuple(t))] = time_us(call, inputs, a.reps)
        timed = {k: v for k, v in row["tiles"].items() if isinstance(v, float)}
        best = min(timed, key=timed.get)
        row.update(default_us=timed[str(tuple(default))], best=best, best_us=timed[best])
        if bw:
            row["floor_us"] = moved / bw * 1e6
        rows.append(row)
        floor = f"  floor {row['floor_us']:.1f}" if bw else ""
        print(f"{label:16} default {row['default_us']:7.1f}  best {row['best_us']:7.1f} "
              f"{best}{floor}", flush=True)  # fmt: skip
        del inputs
        write(a.out, rows, ceilings, [])
    # One tile for every shape: the geomean over shapes of its time over each shape's best.
    overall = {}
    for t in TILES:
        k = str(tuple(t))
        times = [r["tiles"].get(k) for r in rows]
        ratios = [v / r["best_us"] for v, r in zip(times, rows, strict=True)
                  if isinstance(v, float)]  # fmt: skip
        if len(ratios) == len(rows):
            overall[k] = statistics.geometric_mean(ratios)
    ranked = sorted(overall.items(), key=lambda kv: kv[1])
    write(a.out, rows, ceilings, ranked)
    print("one tile for all shapes (geomean of time / each shape's best):")
    print(f"  default {tuple(default)!s}: {overall.get(str(tuple(default)), float('nan')):.3f}")
    for k, v in ranked[:5]:
        print(f"  {k}: {v:.3f}")


if __name__ == "__main__":
    main()
