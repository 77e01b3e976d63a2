#!/usr/bin/env bash
# One device call (< 600 s) for ops.SORTED_AUTO_MIN_M's rule (sorted rows into and between the
# GEMMs for unquantized ops of top-k <= 2 from 1,024 tokens where the rows load through TMA): the
# GPU tests of sorted rows and direct slots, then benchmarks/ab_interleaved.py with variants auto
# (the rule on) and auto-unsorted (off) for Mixtral-8x7B TP2 bf16 at M = 512 (below the limit:
# a control, the same op twice), 1024, 2048 and 4096, each kernel profiled.
# Usage: bash benchmarks/gpu_sorted_auto.sh   (everything in $OUT/sorted_auto.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/sorted_auto
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $R/summary.txt
timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_sorted_rows.py \
  tests/test_direct_slots.py > $R/pytest-gpu.log 2>&1
echo "pytest rc=$? $(tail -1 $R/pytest-gpu.log)" | tee -a $R/summary.txt
timeout ${AB_S:-300} python3 benchmarks/ab_interleaved.py $R/ab.json --profile \
  --variants auto,auto-unsorted --problems Mixtral-8x7B --quants bf16 --m ${MS:-512,1024,2048,4096} \
  --seconds ${SECONDS_AB:-1.5} > $R/ab.txt 2>&1
echo "ab rc=$?" | tee -a $R/summary.txt
grep -v -i warn $R/ab.txt | tail -14
(cd $OUT && tar czf sorted_auto.tgz sorted_auto && rm -rf sorted_auto)
