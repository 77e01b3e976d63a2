#!/usr/bin/env bash
# Re-tune shipped tables of one model at batch sizes BS, confirm the changed entries and bench
# the result, in one device call (< 600 s):
# 1. gpu_decode_retune.sh for each MODEL:TP[:QUANT] argument (one model and TP for all): with
#    TILES=full (the default here) a halving sweep of the whole space within BUDGET seconds
#    (default 200) at BS (default the 13 sizes from 24 to 4096); with TILES=decode the
#    exhaustive sweep of the decode tiles (BLOCK_SIZE_M 16). The shipped entry is re-timed among
#    the finalists (--incumbent auto).
# 2. gpu_confirm_retune.sh: every changed entry timed interleaved against the shipped one, the
#    confirmed ones (>= 1% faster by the median round, faster in every round) merged into a copy
#    of configs/, then `moetune bench` of the model with the merged and the shipped tables
#    (AFTER=none: no bench).
# 3. VERIFY="TABLE ..." (paths under configs/): `moetune verify` of those shipped tables.
# Why: the H100 tables' entries from M=24 up predate most of the kernel's changes (TMA weights
# 0.2.7, PDL 0.2.11, sorted rows 0.2.15); the Qwen3 fp8 ones were timed with dynamic activation
# scales, which take the fused GEMM1 path that static scales leave above 64 tokens
# (results/kernels/NOTES.md §13).
# Usage: bash benchmarks/gpu_retune_confirm.sh Qwen3-30B-A3B:2:fp8_w8a8 [Qwen3-30B-A3B:2 ...]
#        ($OUT/retune.tgz: journals and finalists; $OUT/confirm.tgz: timings, merged tables,
#        both benches. Merge here: python benchmarks/merge_confirmed.py CONFIRM_DIR J configs.)
set -u -o pipefail
[ $# -ge 1 ] || { echo "Error: give MODEL:TP[:QUANT] arguments" >&2; exit 2; }
quants=()
for spec in "$@"; do
  IFS=: read -r model tp quant <<< "$spec"
  quants+=("${quant:-bf16}")
done
BUDGET=${BUDGET:-200} SWEEP_S=${SWEEP_S:-230} TILES=${TILES:-full} \
  BS=${BS:-24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096} \
  bash benchmarks/gpu_decode_retune.sh "$@"
J=$(mktemp -d)
tar xzf "$OUT/retune.tgz" -C "$J"
J=$J/retune CONFIRM_S=${CONFIRM_S:-120} AFTER=${AFTER:-report} SPECS="$model:$tp" \
  QUANTS="${quants[*]}" BENCH_S=${BENCH_S:-80} bash benchmarks/gpu_confirm_retune.sh
i=0
for table in ${VERIFY:-}; do
  i=$((i + 1))
  PYTHONPATH=. timeout 60 python3 -m moetune.cli verify "$table" > "$OUT/verify-$i.txt" 2>&1
  echo "verify $table rc=$?"; tail -3 "$OUT/verify-$i.txt"
done
echo "all done at ${SECONDS} s"
