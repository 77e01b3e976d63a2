"""Time the dynamic per-group fp8 activation quantization alone, at the shapes the block-fp8 op
quantizes (the input ``[M, K]`` and the intermediate ``[M·topk, N]``), for several tile sizes of
``quant_kernel._quant_group_rows_kernel`` (``GROUP_TILE`` elements a program at most, once the
grid has ``FILL_PROGRAMS`` programs) and for the
one-program-per-row-and-group kernel (``GROUP_ROWS_KERNEL`` off). CUDA-graph timing; the floor
is bytes moved / the bandwidth of a device copy measured in the same run. Each variant's output
is compared bit for bit with PyTorch's quantization first.

Usage: python benchmarks/quant_group_tile.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import triton.testing

from moetune import quant_kernel
from moetune.quant import quantize_activation
from moetune.quant_kernel import quantize_activation_fast

SHAPES = [(1, 2048), (8, 384), (8, 2048), (64, 384), (512, 2048), (4096, 384), (4096, 2048),
          (32768, 384)]  # fmt: skip
TILES = [1024, 2048, 4096, 8192]
FP8 = torch.float8_e4m3fn


def main(out: str) -> None:
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_us = triton.testing.do_bench_cudagraph(lambda: big.clone()) * 1e3
    bw = 2 * big.numel() / (copy_us * 1e-6)  # bytes/s, read + write
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    default_rows, default_tile = quant_kernel.GROUP_ROWS_KERNEL, quant_kernel.GROUP_TILE
    for T, K in SHAPES:
        x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
        want, want_s = quantize_activation(x, FP8, group_k=128)
        floor = (x.numel() * 2 + x.numel() + want_s.numel() * 4) / bw * 1e6
        row = {"T": T, "K": K, "floor_us": floor}
        for name, tile in [("row-group", None)] + [(f"rows{t}", t) for t in TILES]:
            quant_kernel.GROUP_ROWS_KERNEL = tile is not None
            quant_kernel.GROUP_TILE = tile or default_tile
            q, s = quantize_activation_fast(x, FP8, group_k=128)
            ok = torch.equal(q.view(torch.uint8), want.view(torch.uint8)) and torch.equal(s, want_s)
            us = triton.testing.do_bench_cudagraph(
                lambda x=x: quantize_activation_fast(x, FP8, group_k=128)) * 1e3  # fmt: skip
            row[name] = us if ok else f"MISMATCH {us}"
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)  # fmt: skip
    quant_kernel.GROUP_ROWS_KERNEL, quant_kernel.GROUP_TILE = default_rows, default_tile
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": rows}, f,
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
