#!/usr/bin/env bash
# One device call: the bench tests on the GPU, then `moetune bench` on Mixtral-8x7B TP2 (bf16,
# vLLM's 18 batch sizes, the shipped H100 table), a one-hot routing run, and DeepSeek-V3 TP8
# (fp8 block quantization). JSON and PNG per run, and the progress log, land in $OUT.
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_bench.py -p no:cacheprovider 2>&1 | tail -3
bench() { python3 -m moetune.cli bench "$@"; }
bench --model Mixtral-8x7B --tp 2 --out "$OUT" 2>> "$OUT/bench.log"
echo "mixtral rc=$?"
bench --model Mixtral-8x7B --tp 2 --skew one-hot --batch-sizes 1,64,1024 --out "$OUT" \
  2>> "$OUT/bench.log" | tail -n 12
echo "one-hot rc=$?"
bench --model DeepSeek-V3 --tp 8 --batch-sizes 1,16,256,2048 --out "$OUT" 2>> "$OUT/bench.log" \
  | tail -n 14
echo "deepseek rc=$?"
grep -E "Error|Traceback|rror:" "$OUT/bench.log" | head -5
