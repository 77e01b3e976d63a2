#!/usr/bin/env bash
# One device call (< 600 s) for the two-launch routing (align_kernel.RANKED_DEFAULT) and the
# activation kernel's tile: their GPU tests, benchmarks/activation_tiles.py, and
# benchmarks/ab_interleaved.py with variants auto and auto-ranked (the routing's other path: since
# 0.2.14 the three launches) at M = 128, 512, 2048 (past one program's 256 slots), each kernel
# profiled. results/kernels/h100-0.2.14-routing-act/ holds its run from before the switch.
# Usage: bash benchmarks/gpu_routing_act.sh   (everything in $OUT/routing_act.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/routing_act
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $R/summary.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_align.py tests/test_activation.py \
  tests/test_sorted_rows.py > $R/pytest-gpu.log 2>&1
echo "pytest rc=$? $(tail -1 $R/pytest-gpu.log)" | tee -a $R/summary.txt
timeout 170 python3 benchmarks/activation_tiles.py $R/activation_tiles.json --reps ${REPS:-30} \
  > $R/activation_tiles.txt 2>&1
echo "activation_tiles rc=$?" | tee -a $R/summary.txt
timeout ${AB_S:-230} python3 benchmarks/ab_interleaved.py $R/ab_ranked.json --profile \
  --variants auto,auto-ranked --m ${MS:-128,512,2048} --seconds ${SECONDS_AB:-1.5} \
  > $R/ab_ranked.txt 2>&1
echo "ab ranked rc=$?" | tee -a $R/summary.txt
grep -v -i warn $R/activation_tiles.txt | tail -18
grep -v -i warn $R/ab_ranked.txt | tail -19
(cd $OUT && tar czf routing_act.tgz routing_act && rm -rf routing_act)
