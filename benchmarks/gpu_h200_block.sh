#!/usr/bin/env bash
# The H200 block-fp8 table for Qwen3-30B-A3B-FP8 TP2 in one device call (< 600 s), on an H200
# only: a halving sweep over the full space narrowed to the knobs the
# block tables use (BLOCK_SIZE_K=128, num_stages 3-5, GROUP_SIZE_M 1 or 16; SWEEP_S, default
# 300 s; or BUDGET, seconds, for --budget), `verify` of its table, and `moetune bench` with it and with vLLM's H200 block table
# (from ./vllmref, carried: MOETUNE_CONFIG_DIR), each against the default config and the floor.
# Then, if SUSTAINED=1, benchmarks/sustained_peak.py for Mixtral-8x7B TP2 bf16 at M=4096 (on
# another card: that alone, then exit 3).
# Usage: bash benchmarks/gpu_h200_block.sh   (everything in $OUT/h200blk.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/h200blk
mkdir -p $R/configs $R/bench-ours $R/bench-vllm
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $R/summary.txt
if ! grep -q H200 $R/summary.txt; then  # another card: only the sustained-peak measurement
  echo "not an H200: no table" | tee -a $R/summary.txt
  timeout 100 python3 benchmarks/sustained_peak.py $R/sustained-mixtral-bf16-m4096.json \
    --m 4096 > $R/sustained.txt 2>&1
  echo "sustained rc=$?" | tee -a $R/summary.txt; grep -v -i warn $R/sustained.txt | tail -4
  (cd $OUT && tar czf h200blk.tgz h200blk && rm -rf h200blk)
  exit 3
fi
# BUDGET (seconds) swaps --keep 0.05 for --budget, for a call with little device time left.
KNOB="--keep 0.05"; [ -n "${BUDGET:-}" ] && KNOB="--budget $BUDGET"
/usr/bin/time -f "sweep wall=%e s" timeout "${SWEEP_S:-300}" python3 -m moetune.cli sweep \
  --model Qwen3-30B-A3B-FP8 --tp 2 --space full --restrict BLOCK_SIZE_K=128 \
  --restrict num_stages=3,4,5 --restrict GROUP_SIZE_M=1,16 --strategy halving $KNOB \
  --json --journal $R/Qwen3-30B-A3B-FP8-tp2-fp8block.jsonl --out $R/configs \
  > $R/sweep.json 2> $R/sweep.stderr.txt
echo "sweep rc=$? $(tail -1 $R/sweep.stderr.txt)" | tee -a $R/summary.txt
timeout "${VERIFY_S:-90}" python3 -m moetune.cli verify $R/configs > $R/verify.txt 2>&1
echo "verify rc=$?" | tee -a $R/summary.txt
for who in ours vllm; do
  dir=$R/configs; [ $who = vllm ] && dir=vllmref
  MOETUNE_CONFIG_DIR=$dir timeout "${BENCH_S:-110}" python3 -m moetune.cli bench --model Qwen3-30B-A3B-FP8 \
    --tp 2 --batch-sizes 1,8,32,128,512,2048,4096 --out $R/bench-$who > $R/bench-$who/bench.txt 2>&1
  echo "bench $who rc=$?" | tee -a $R/summary.txt
done
if [ "${SUSTAINED:-0}" = 1 ]; then
  timeout 60 python3 benchmarks/sustained_peak.py $R/sustained-mixtral-bf16-m4096.json \
    --m 4096 --seconds 6 > $R/sustained.txt 2>&1
  echo "sustained rc=$?" | tee -a $R/summary.txt
fi
tail -n 4 $R/verify.txt; tail -n 14 $R/bench-ours/bench.txt $R/bench-vllm/bench.txt
[ -f $R/sustained.txt ] && grep -v -i warn $R/sustained.txt | tail -4
gzip -f $R/*.jsonl 2>/dev/null
(cd $OUT && tar czf h200blk.tgz h200blk && rm -rf h200blk)
