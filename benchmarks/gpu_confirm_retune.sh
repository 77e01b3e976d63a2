#!/usr/bin/env bash
# The H100 decode re-tune of moetune 0.2.11 (results/tables/h100-0.2.11-decode-retune/), each
# point where the sweep's winner differs from the shipped entry timed interleaved against it by
# benchmarks/close_configs.py (shipped entry first, timed twice: its two copies give the noise
# floor). Then the confirmed entries are merged into a copy of configs/
# (benchmarks/merge_confirmed.py) and, if time is left, the 42 points of issue 5 timed with those
# tables (gpu_fused.sh, VARIANTS auto and auto-pdl-early, MOETUNE_CONFIG_DIR). One device call
# (< 600 s); everything in $OUT/confirm.tgz, a summary printed last.
# Usage: bash benchmarks/gpu_confirm_retune.sh   (ROUNDS, default 7)
set -u -o pipefail
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
R=$OUT/confirm
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $R/summary.txt
run() {
  local name=$1; shift
  timeout 100 python3 benchmarks/close_configs.py $R/$name.json --rounds "${ROUNDS:-7}" "$@" \
    > $R/$name.txt 2>&1
  echo "$name rc=$?" | tee -a $R/summary.txt
}
run Mixtral-8x7B-tp2-bf16 --model Mixtral-8x7B --tp 2 \
  --point 1:M16-N32-K128-G1-w4-s5,M16-N32-K128-G16-w4-s3 \
  --point 2:M16-N64-K128-G16-w4-s5,M16-N32-K256-G16-w4-s5 \
  --point 4:M16-N32-K256-G1-w4-s5,M16-N32-K256-G32-w4-s5
run Mixtral-8x7B-tp2-fp8_w8a8 --model Mixtral-8x7B --tp 2 --quant fp8_w8a8 \
  --point 1:M16-N64-K256-G16-w4-s5,M16-N32-K256-G1-w4-s3 \
  --point 2:M16-N128-K256-G32-w4-s5,M16-N32-K256-G1-w4-s5 \
  --point 4:M16-N64-K256-G1-w4-s3,M16-N32-K256-G32-w4-s5 \
  --point 8:M16-N32-K256-G64-w4-s5,M16-N64-K256-G1-w4-s5 \
  --point 16:M16-N64-K256-G1-w4-s3,M16-N64-K256-G1-w4-s5
run Qwen3-30B-A3B-tp2-bf16 --model Qwen3-30B-A3B --tp 2 \
  --point 1:M16-N64-K128-G1-w4-s3,M16-N32-K128-G1-w4-s5 \
  --point 2:M16-N32-K64-G64-w4-s4,M16-N32-K128-G1-w4-s3 \
  --point 4:M16-N32-K64-G64-w4-s3,M16-N32-K128-G32-w4-s3 \
  --point 8:M16-N32-K128-G32-w4-s2,M16-N64-K128-G1-w4-s3 \
  --point 16:M16-N32-K128-G1-w4-s3,M16-N64-K128-G32-w4-s4
run Qwen3-30B-A3B-tp2-fp8_w8a8 --model Qwen3-30B-A3B --tp 2 --quant fp8_w8a8 \
  --point 1:M16-N64-K128-G1-w4-s4,M16-N32-K128-G32-w4-s5 \
  --point 2:M16-N64-K128-G1-w4-s5,M16-N32-K128-G1-w4-s5 \
  --point 8:M16-N32-K128-G1-w4-s3,M16-N64-K128-G1-w4-s3 \
  --point 16:M16-N32-K128-G1-w4-s4,M16-N64-K128-G1-w4-s5
run Qwen3-30B-A3B-FP8-tp2-fp8block --model Qwen3-30B-A3B-FP8 --tp 2 \
  --point 2:M16-N32-K128-G1-w4-s3,M16-N32-K128-G1-w4-s5 \
  --point 4:M16-N128-K128-G16-w4-s3,M16-N32-K128-G1-w4-s3 \
  --point 16:M16-N128-K128-G1-w4-s2,M16-N128-K128-G1-w4-s3
run gpt-oss-120b-tp1-bf16 --model gpt-oss-120b --tp 1 \
  --point 1:M16-N32-K128-G32-w4-s4,M16-N32-K64-G16-w4-s5 \
  --point 2:M16-N64-K128-G32-w4-s4,M16-N64-K128-G1-w4-s5 \
  --point 4:M16-N32-K128-G64-w4-s5,M16-N64-K128-G1-w4-s5 \
  --point 8:M16-N32-K128-G64-w4-s5,M16-N32-K256-G1-w4-s5 \
  --point 16:M16-N32-K256-G1-w4-s4,M16-N32-K256-G1-w4-s5
run gpt-oss-120b-tp1-fp8_w8a8 --model gpt-oss-120b --tp 1 --quant fp8_w8a8 \
  --point 1:M16-N64-K128-G1-w4-s4,M16-N32-K128-G1-w4-s4 \
  --point 2:M16-N64-K256-G64-w4-s4,M16-N64-K256-G1-w4-s4 \
  --point 4:M16-N32-K256-G64-w4-s5,M16-N32-K256-G1-w4-s5 \
  --point 8:M16-N32-K256-G64-w4-s5,M16-N32-K256-G1-w4-s5
cp -r configs $R/merged
python3 benchmarks/merge_confirmed.py $R results/tables/h100-0.2.11-decode-retune $R/merged \
  > $R/merge.txt 2>&1
echo "merge rc=$? after ${SECONDS} s" | tee -a $R/summary.txt
if [ $SECONDS -lt 380 ]; then
  MOETUNE_CONFIG_DIR=$R/merged PYTEST=0 VARIANTS=auto,auto-pdl-early BREAKDOWN_S=$((560 - SECONDS)) \
    OUT=$R/after bash benchmarks/gpu_fused.sh > $R/after.txt 2>&1
  echo "after rc=$?" | tee -a $R/summary.txt
fi
(cd $OUT && tar czf confirm.tgz confirm)
cat $R/merge.txt
grep "geomean time/floor" $R/after.txt 2>/dev/null | tail -14
rm -rf $R
