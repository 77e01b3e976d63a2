#!/usr/bin/env bash
# One device call (< 600 s) for persistent GEMMs (launch.PERSISTENT_*): first
# benchmarks/ab_interleaved.py with VARIANTS (default auto, auto-persist: one program per SM
# looping over tiles with the tile and K loops flattened, auto-persist-nf: not flattened) for
# PROBLEMS in bf16 and fp8_w8a8 at MS (default 2048,4096), each variant checked against the
# float64 reference first, then CUDA graphs replayed in alternation; then, in the time left,
# the GPU tests of persistent GEMMs and of dependent launches.
# Usage: bash benchmarks/gpu_persistent.sh   (everything in $OUT/persistent.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/persistent
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $R/summary.txt
timeout ${AB_S:-420} python3 benchmarks/ab_interleaved.py $R/ab.json \
  --variants ${VARIANTS:-auto,auto-persist,auto-persist-nf} \
  --problems ${PROBLEMS:-Qwen3-30B-A3B,Mixtral-8x7B,gpt-oss-120b} --quants bf16,fp8_w8a8 \
  --m ${MS:-2048,4096} --seconds ${SECONDS_AB:-1.0} ${PROFILE:+--profile} > $R/ab.txt 2>&1
echo "ab rc=$?" | tee -a $R/summary.txt
timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_persistent.py \
  tests/test_pdl.py > $R/pytest-gpu.log 2>&1
echo "pytest rc=$? $(tail -1 $R/pytest-gpu.log)" | tee -a $R/summary.txt
grep -v -i warn $R/ab.txt | tail -14
(cd $OUT && tar czf persistent.tgz persistent && rm -rf persistent)
