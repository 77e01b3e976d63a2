#!/usr/bin/env bash
# The op's GEMMs beside PyTorch's grouped GEMMs (CUTLASS on Hopper) on the same rows, one device
# call (< 600 s): benchmarks/grouped_ceiling.py for the three reference problems, bf16 and fp8
# with static scales, at M (default 512, 2048, 4096). It says how far a library kernel is from
# the floor at the compute-bound points, where the op is 1.09-1.56x it
# (results/kernels/NOTES.md §21, §29, §30).
# Env PROBLEMS and QUANTS narrow it (grouped_ceiling.py's --problems, --quants).
# Usage: bash benchmarks/gpu_grouped_ceiling.sh   (JSON, JSONL and the log in $OUT/grouped/)
set -u -o pipefail
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
R=$OUT/grouped
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $R/gpu.txt
timeout "${CEILING_S:-420}" python3 benchmarks/grouped_ceiling.py $R/grouped.json --m "${M:-512,2048,4096}" \
  ${PROBLEMS:+--problems "$PROBLEMS"} ${QUANTS:+--quants "$QUANTS"} \
  > $R/grouped.txt 2>&1
echo "grouped_ceiling rc=$? after ${SECONDS} s" | tee -a $R/gpu.txt
grep -v -i warn $R/grouped.txt | tail -n 20
