#!/usr/bin/env bash
# Re-tune one shipped table's entries above the decode sizes on the GPU at hand, in one device
# call (< 600 s). The H100 tables' entries from M=24 up predate most of the kernel's changes
# (TMA weights 0.2.7, PDL 0.2.11, sorted rows 0.2.15); the Qwen3 fp8 ones were also timed with
# dynamic activation scales, which take the fused GEMM1 path that static scales leave above 64
# tokens (results/kernels/NOTES.md §13).
# 1. gpu_decode_retune.sh with TILES=full: a halving sweep of the whole space within BUDGET
#    seconds (default 200) at BS (default the 13 sizes from 24 to 4096), the shipped entry
#    re-timed among the finalists (--incumbent auto);
# 2. gpu_confirm_retune.sh: every changed entry timed interleaved against the shipped one, the
#    confirmed ones (>= 1% faster by the median round, faster in every round) merged into a copy
#    of configs/, then `moetune bench` of the problem with the merged and the shipped tables.
# Usage: bash benchmarks/gpu_retune_full.sh Qwen3-30B-A3B:2:fp8_w8a8
#        ($OUT/retune.tgz: journals and finalists; $OUT/confirm.tgz: timings, merged tables,
#        both benches. Merge here: python benchmarks/merge_confirmed.py CONFIRM_DIR J configs.)
set -u -o pipefail
[ $# -eq 1 ] || { echo "Error: one MODEL:TP[:QUANT] argument" >&2; exit 2; }
IFS=: read -r model tp quant <<< "$1"
BUDGET=${BUDGET:-200} SWEEP_S=${SWEEP_S:-230} TILES=full \
  BS=${BS:-24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096} \
  bash benchmarks/gpu_decode_retune.sh "$1"
J=$(mktemp -d)
tar xzf "$OUT/retune.tgz" -C "$J"
J=$J/retune CONFIRM_S=${CONFIRM_S:-120} AFTER=report SPECS="$model:$tp" QUANTS="${quant:-bf16}" \
  BENCH_S=${BENCH_S:-80} bash benchmarks/gpu_confirm_retune.sh
echo "all done at ${SECONDS} s"
