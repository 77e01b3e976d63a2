#!/usr/bin/env bash
# The ratio report on the GPU at hand, in one device call: `moetune bench` of the three reference
# problems (Mixtral-8x7B TP2, Qwen3-30B-A3B TP2, gpt-oss-120b TP1) in bf16 and fp8_w8a8 (static
# activation scales, as vLLM's reference figures) at M = 1, 8, 32, 128, 512, 2048, 4096, each
# with the shipped table for this GPU where there is one, the default config and the floor;
# then benchmarks/report_table.py writes REPORT.md (per batch size, and geomean against vLLM).
# Usage: benchmarks/gpu_report.sh   (JSON, PNG, logs in $OUT/report.tgz; REPORT.md in $OUT)
#        SPECS="Qwen3-30B-A3B:2" QUANTS="fp8_w8a8" ... runs a subset (default: all six);
#        BENCH_S caps each bench (seconds, default 200), to fit a device call.
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
R="$OUT/report"
mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$R/gpu.txt"
for spec in ${SPECS:-Mixtral-8x7B:2 Qwen3-30B-A3B:2 gpt-oss-120b:1}; do
  IFS=: read -r model tp <<< "$spec"
  for q in ${QUANTS:-bf16 fp8_w8a8}; do
    args=(--batch-sizes 1,8,32,128,512,2048,4096)
    [ $q = fp8_w8a8 ] && args+=(--quant fp8_w8a8 --static-scales)
    timeout "${BENCH_S:-200}" python3 -m moetune.cli bench --model "$model" --tp "$tp" "${args[@]}" \
      --out "$R" > "$R/$model-$q.txt" 2>&1
    echo "$model tp$tp $q rc=$? at ${SECONDS} s" | tee -a "$R/summary.txt"
  done
done
python3 benchmarks/report_table.py "$R"/*.json | tee "$R/REPORT.md"
# The device returns a limited number of files: one archive, and the report beside it.
cp "$R/REPORT.md" "$OUT/REPORT.md" && cd "$OUT" && tar czf report.tgz report && rm -rf report
