#!/usr/bin/env bash
# GPU checks and measurement of the activation in GEMM1's epilogue (ops.FUSE_GEMM1_ACTIVATION),
# one GPU, one device call (< 600 s):
#   1. the GPU tests of the fused epilogue (bits equal to the unfused steps in bf16, fp16, fp8),
#      the op, the re-quantization check, the activation kernel and the fp8 accumulation modes
#      (TESTS=... picks other test files);
#   2. benchmarks/kernel_breakdown.py --compare: each kernel's time per call, and the op in the
#      VARIANTS (default unfused, fused, auto) timed interleaved, each checked first, for
#      the three reference problems in bf16 and fp8 (static scales) at the seven batch sizes of
#      issue 5, with the floor;
#      (QUANTS=fp8_w8a8: only the fp8 points; PROBLEMS=Qwen3-30B-A3B-FP8: that problem alone,
#      in its own block fp8);
#   3. with VERIFY=1, `moetune verify` of every shipped table (four at a time on the one GPU:
#      numerics only), so every shipped config has compiled and passed in the fused kernel.
# Usage: bash benchmarks/gpu_fused.sh   (everything in $OUT/fused.tgz; the table printed last)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
R=$OUT/fused
mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$R/summary.txt"
if [ "${PYTEST:-1}" = 1 ]; then
  timeout "${PYTEST_S:-240}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_fused_gemm1.py tests/test_op.py \
    tests/test_requant.py tests/test_activation.py tests/test_accum.py} > "$R/pytest-gpu.log" 2>&1
  echo "pytest rc=$? $(tail -1 "$R/pytest-gpu.log")" | tee -a "$R/summary.txt"
fi
if [ "${BREAKDOWN:-1}" = 1 ]; then
  timeout "${BREAKDOWN_S:-330}" python3 benchmarks/kernel_breakdown.py "$R/breakdown.json" --compare \
    --variants "${VARIANTS:-unfused,fused,auto}" --m "${MS:-1,8,32,128,512,2048,4096}" \
    --quants "${QUANTS:-bf16,fp8_w8a8}" ${PROBLEMS:+--problems "$PROBLEMS"} \
    2>&1 | grep -v -i warn > "$R/breakdown.log"
  echo "breakdown rc=$?" | tee -a "$R/summary.txt"
fi
if [ "${VERIFY:-0}" = 1 ]; then
  ls configs/E=*.json | grep -v provenance | xargs -P 4 -I{} sh -c \
    'timeout 400 python3 -m moetune.cli verify "{}" > "$0/verify-$(basename "{}" .json | tr "=," "__").txt" 2>&1; echo "verify rc=$? {}"' "$R" \
    | tee -a "$R/summary.txt"
fi
(cd "$OUT" && tar czf fused.tgz fused && rm -rf fused)
python3 - "$OUT/fused.tgz" <<'PY'
import json, sys, tarfile
from statistics import geometric_mean as gm
t = tarfile.open(sys.argv[1])
try:
    rows = json.load(t.extractfile("fused/breakdown.json"))["rows"]
except KeyError:  # cut by its timeout: the rows written as they were measured
    try:
        rows = [json.loads(line) for line in t.extractfile("fused/breakdown.jsonl")]
    except KeyError:
        rows = []
names = ["unfused", "fused", "fused-pairs", "auto", "auto-sum", "auto-rq", "auto-ts", "auto-pairs",
         "auto-tma", "auto-bound", "auto-bs", "auto-gq", "auto-direct",
         "auto-pdl", "auto-pdl-early", "auto-pdl-late", "auto-pdl1", "auto-sorted",
         "auto-sorted-ptr", "auto-sorted-in"]
groups, every = {}, {}
for r in rows:
    head = f"{r['problem'][:8]} {r['quant']:>8} M={r['M']:<5}"
    timed = [n for n in names if f"{n}_us" in r]
    if not timed:
        print(f"{head} not timed (check failed?)")
        continue
    f = r["floor_us"]
    print(head + "  ".join(f"{n} {r[n + '_us']:8.1f} µs ({r[n + '_us'] / f:.2f})" for n in timed))
    for n in timed:
        groups.setdefault((r["problem"], r["quant"], n), []).append(r[n + "_us"] / f)
        every.setdefault(n, []).append(r[n + "_us"] / f)
for (p, q, n), v in groups.items():
    print(f"geomean time/floor {p} {q} {n} ({len(v)} M): {gm(v):.3f}")
for n, v in every.items():
    print(f"geomean time/floor, all {len(v)} points, {n}: {gm(v):.3f}")
PY
