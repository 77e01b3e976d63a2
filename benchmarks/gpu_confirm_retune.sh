#!/usr/bin/env bash
# The H100 decode re-tune of moetune 0.2.11 (results/tables/h100-0.2.11-decode-retune/), each
# point where the sweep's winner differs from the shipped entry timed interleaved against it by
# benchmarks/close_configs.py (shipped entry first, timed twice: its two copies give the noise
# floor). One device call (< 600 s); everything in $OUT/confirm.tgz, a summary printed last.
# Usage: bash benchmarks/gpu_confirm_retune.sh   (ROUNDS, default 9)
set -u -o pipefail
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
R=$OUT/confirm
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $R/summary.txt
run() {
  local name=$1; shift
  timeout 150 python3 benchmarks/close_configs.py $R/$name.json --rounds "${ROUNDS:-9}" "$@" \
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
(cd $OUT && tar czf confirm.tgz confirm)
python3 - $R/*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    for pt in d["points"]:
        a, b, again = pt["rows"]
        print(f"{path.split('/')[-1][:-5]:<32} M={pt['M']:<3} {a['config']} {a['median_us']:8.1f} µs"
              f" -> {b['config']} {b['median_us']:8.1f} µs: x{b['ratio_median']:.3f}"
              f" ({b['ratio_min']:.3f}-{b['ratio_max']:.3f}); again x{again['ratio_median']:.3f}")
PY
rm -rf $R
