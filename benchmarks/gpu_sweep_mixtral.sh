#!/usr/bin/env bash
# One device call: the test suite on the GPU, a real sweep of Mixtral-8x7B TP2 (bf16, fast space,
# vLLM's 18 batch sizes), then `moetune verify` of the table it wrote and of vLLM's shipped tables
# for the same shape (copied into .carry/ beforehand). Everything lands in $OUT.
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${TEST_TIMEOUT:-75}" python3 -m pytest -q tests -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1
tail -3 "$OUT/pytest-gpu.log"
J=results/sweeps/NVIDIA_H100_80GB_HBM3-mixtral-8x7b-tp2-bf16-fast.jsonl
timeout "${SWEEP_TIMEOUT:-430}" python3 -m moetune.cli sweep --model Mixtral-8x7B --tp 2 \
  --space fast --journal "$J" --out results/tables --json > "$OUT/sweep.json" 2> "$OUT/sweep.err"
echo "sweep rc=$?"
# A sweep cut short by the time limit still exports what its journal holds (it resumes later).
ls results/tables/E=8,N=7168,* >/dev/null 2>&1 || \
  python3 -m moetune.cli export-configs "$J" --out results/tables > "$OUT/export.txt" 2>&1
cp "$J" "$OUT/" 2>/dev/null
cp results/tables/E=8,N=7168,device_name=*.json "$OUT/" 2>/dev/null
timeout 60 python3 -m moetune.cli verify results/tables .carry --json > "$OUT/verify.json" 2>&1
echo "verify rc=$?"
tail -5 "$OUT/sweep.err"
python3 - <<'PY'
import json, os
try:
    d = json.load(open(os.environ["OUT"] + "/sweep.json"))
except ValueError:
    raise SystemExit("sweep did not finish: see sweep.err")
print(f"wall {d['wall_s']} s")
for b in d["batches"]:
    print(b["M"], b["best"], b["time_us"], b["default_us"], b["speedup_vs_default"], b["counts"])
PY
