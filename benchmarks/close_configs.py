"""Time near-equal configs of one problem and batch size interleaved, to tell a real difference
from drift. The Mixtral-8x7B TP2 bf16 re-tune on an H100 ranked num_stages 4 over 3 at M=4096
(2544 vs 2697 µs, 5 replays each, minutes apart) where `moetune bench` a minute later said the
opposite (2752 vs 2612 µs): a compute-bound point whose one-candidate spread (p20-p80 of 40
replays) was 8%.

Each config is checked once against the reference, then timed in ROUNDS rounds; each round times
every config (CUDA graph over rotating input sets, REPLAYS replays, median) in an order that
reverses every round (ABC CBA ...), so a linear drift falls on all alike. The first config is
also timed a second time under another name (``A-again``): the spread between two copies of one
config is the noise floor of the comparison. ``nvidia-smi`` logs SM clock and power meanwhile.

Several points of one problem run in one process (``--point M:A,B`` repeated; the inputs are
drawn once at the largest M and sliced). ``--quant fp8_w8a8`` quantizes a bf16 preset's weights
per tensor and its activations with static scales calibrated on each input set, as
``kernel_breakdown.py`` and the sweep's ``--act-scales static`` do; the -FP8 presets keep their
block scales (dynamic activation scales).

Usage: python benchmarks/close_configs.py OUT.json --model Mixtral-8x7B --tp 2
       --point 4096:M128-N256-K64-G16-w8-s3,M128-N256-K64-G16-w8-s4 [--point ...]
       [--quant fp8_w8a8] [--rounds 15] [--replays 10]
       (or the older form: --m 4096 --configs A,B)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time

import smi_log
import torch

from moetune.check import check_op
from moetune.evaluate import Workload
from moetune.inputs import static_activation_scales, timing_input_sets
from moetune.ops import fused_experts
from moetune.presets import preset_problem
from moetune.reference import Reference
from moetune.timing import time_op

DEVICE = "cuda"  # "cpu" runs time_point in Triton's interpreter (to try the script, not to time)
NAME = re.compile(r"M(\d+)-N(\d+)-K(\d+)-G(\d+)-w(\d+)-s(\d+)")


def parse(name: str) -> dict[str, int]:
    """A config from the journal's candidate name, e.g. ``M128-N256-K64-G16-w8-s3``."""
    m = NAME.fullmatch(name)
    if m is None:
        raise SystemExit(f"Error: {name!r} is not a name like M128-N256-K64-G16-w8-s3")
    bm, bn, bk, g, w, s = map(int, m.groups())
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": g,
            "num_warps": w, "num_stages": s}  # fmt: skip


def _points(a: argparse.Namespace) -> list[tuple[int, list[str]]]:
    points = []
    for spec in a.point or []:
        m, _, names = spec.partition(":")
        if not m.isdigit() or not names:
            raise SystemExit(f"Error: --point {spec!r} is not M:CONFIG,CONFIG")
        points.append((int(m), names.split(",")))
    if a.configs:
        points.append((a.m, a.configs.split(",")))
    if not points:
        raise SystemExit("Error: give --point M:A,B (or --m M --configs A,B)")
    return points


def time_point(problem, sets, M: int, names: list[str], rounds: int, replays: int) -> dict:
    """Check each config of ``names`` at batch size ``M``, then time them interleaved."""
    configs = {n: parse(n) for n in names}
    configs[f"{names[0]}-again"] = configs[names[0]]
    ins = [Workload.slice(s, M) for s in sets]
    if problem.takes_static_scales:
        ins = [(args, {**kw, **static_activation_scales(args, kw)}) for args, kw in ins]
    ref = Reference(*ins[0][0], **ins[0][1])
    runs = {}
    for name, cfg in configs.items():

        def run(i: int, cfg=cfg) -> torch.Tensor:
            return fused_experts(*ins[i][0], config=cfg, **ins[i][1])

        check = check_op(lambda run=run: run(0), ref, dtype=problem.torch_dtype,
                         quant=problem.quant)  # fmt: skip
        if not check.ok:
            raise SystemExit(f"Error: {name} fails its check at M={M}: {check.reason}")
        runs[name] = run
    log = smi_log.start(period_ms=200)
    order = list(runs)
    times: dict[str, list[float]] = {n: [] for n in order}
    t0 = time.time()
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t = time_op(runs[name], len(ins), device=DEVICE, replays=replays)
            times[name].append(t.median_us)
    wall = time.time() - t0
    samples = smi_log.samples(log)
    clocks = [mhz for _, mhz, _ in samples]
    power = [w for _, _, w in samples]
    base = times[order[0]]
    rows = []
    print(f"M={M}:", flush=True)
    for name in order:
        ratios = [x / b for x, b in zip(times[name], base, strict=True)]
        rows.append({"config": name, "median_us": statistics.median(times[name]),
                     "min_us": min(times[name]), "max_us": max(times[name]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "rounds_us": times[name]})  # fmt: skip
        print(
            f"  {name:<28} median {rows[-1]['median_us']:8.1f} µs  "
            f"min {rows[-1]['min_us']:8.1f}  max {rows[-1]['max_us']:8.1f}  "
            f"vs {order[0]}: {rows[-1]['ratio_median']:.3f} "
            f"({rows[-1]['ratio_min']:.3f}-{rows[-1]['ratio_max']:.3f})",
            flush=True,
        )
    if clocks:
        print(f"  SM clock {min(clocks):.0f}-{max(clocks):.0f} MHz (median "
              f"{statistics.median(clocks):.0f}), power {min(power):.0f}-{max(power):.0f} W, "
              f"{len(clocks)} samples over {wall:.0f} s")  # fmt: skip
    return {"M": M, "rows": rows, "sm_clock_mhz": clocks, "power_w": power}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="Mixtral-8x7B")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--quant", choices=["fp8_w8a8"], default=None)
    ap.add_argument("--point", action="append", help="M:CONFIG,CONFIG (repeatable)")
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--configs")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--replays", type=int, default=10)
    a = ap.parse_args()
    points = _points(a)
    problem = preset_problem(a.model, a.tp)
    if a.quant:
        problem = dataclasses.replace(problem, quant=a.quant)
    sets = timing_input_sets(problem, max(m for m, _ in points), DEVICE)
    results = [time_point(problem, sets, M, names, a.rounds, a.replays) for M, names in points]
    with open(a.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "problem": f"{a.model} TP{a.tp}",
                   "quant": problem.quant, "rounds": a.rounds, "replays": a.replays,
                   "points": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
