#!/usr/bin/env bash
# One device call (< 600 s): benchmarks/decode_gemm.py's grids at M=1 beyond the tuning space
# (BLOCK_SIZE_K 512, 6 stages, 16-column tiles) for Qwen3-30B-A3B TP2 fp8 (static scales) and
# bf16, and gpt-oss-120b TP1 fp8. Usage: bash benchmarks/gpu_decode_gemm.sh   (everything in $OUT/dg.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/dg
mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$R/summary.txt"
run() {  # name, seconds, decode_gemm.py arguments
  local name=$1 s=$2; shift 2
  timeout "$s" python3 benchmarks/decode_gemm.py "$R/$name.json" "$@" > "$R/$name.txt" 2>&1
  echo "$name rc=$?" | tee -a "$R/summary.txt"
}
run qwen3-fp8-m1 ${QS:-150} --n 16,32,64 --stages 4,5,6
run qwen3-bf16-m1 ${QS:-150} --quant "" --n 16,32,64 --k 64,128,256 --stages 4,5,6
run gptoss-fp8-m1 ${GS:-120} --model gpt-oss-120b --tp 1 --n 32,64 --stages 4,5,6
(cd "$OUT" && tar czf dg.tgz dg && rm -rf dg)
tar xzOf "$OUT/dg.tgz" --wildcards 'dg/*.txt' | grep -E "^(NVIDIA|best|.*shipped)" || true
