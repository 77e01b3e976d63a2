#!/usr/bin/env bash
# One device call on a host of several GPUs, one lane per GPU, all lanes done within BUDGET_S
# (default 540 s). Lane 0 runs CHECKS first when set: the GPU tests of the checker, the op and the
# fp8 quantization, the fp8 accumulation study (benchmarks/fp8_accum.py, Qwen3 at M=2048,4096, 5
# input draws) and `verify` of the tables named in VERIFY_TABLES. Then every lane tunes its specs
# one after the other with benchmarks/gpu_tables.sh (halving, full space), each sweep cut at the
# lane's remaining time, and verifies each table it finishes. Journals live in
# results/tmp/journals (ignored by git), so the same command run again on the still-warm machine
# resumes every cut sweep; copies come back in each spec's folder.
# Usage: LANE0="Qwen3-30B-A3B:2:fp8_w8a8" LANE1="Mixtral-8x7B:2" LANE2=... CHECKS=1 \
#          VERIFY_TABLES="configs/" bash benchmarks/gpu_lanes.sh      (results in $OUT/lanes.tgz)
# ONLY_ON="H200" skips the tuning lanes on any other GPU (tables are per device name).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
J=$PWD/results/tmp/journals
L=$OUT/lanes
mkdir -p "$J" "$L"
END=$(($(date +%s) + ${BUDGET_S:-540}))
VERIFY_S=${VERIFY_S:-90}
nvidia-smi --query-gpu=index,name,clocks.max.sm --format=csv,noheader | tee "$L/gpus.txt"

checks() {
  local c=$L/checks
  mkdir -p "$c"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_requant.py tests/test_check.py \
    tests/test_quant_kernel.py tests/test_timing.py tests/test_procs.py tests/test_op.py \
    > "$c/pytest-gpu.log" 2>&1
  echo "pytest rc=$? $(tail -1 "$c/pytest-gpu.log")" | tee -a "$c/summary.txt"
  timeout 200 python3 benchmarks/fp8_accum.py "$c/fp8_accum_qwen3.json" --model Qwen3-30B-A3B \
    --tp 2 --configs M64-N128-K128-G16-w8-s4,M128-N128-K64-G16-w4-s4 --batch-sizes 2048,4096 \
    --seeds 5 > "$c/fp8_accum_qwen3.txt" 2>&1
  echo "fp8_accum rc=$?" | tee -a "$c/summary.txt"
  for t in ${VERIFY_TABLES:-}; do
    timeout 150 python3 -m moetune.cli verify "$t" > "$c/verify-$(basename "$t").txt" 2>&1
    echo "verify $t rc=$?" | tee -a "$c/summary.txt"
  done
}

lane() {  # lane GPU SPEC...
  local gpu=$1
  shift
  export CUDA_VISIBLE_DEVICES=$gpu
  [ "$gpu" = 0 ] && [ -n "${CHECKS:-}" ] && checks
  for spec in "$@"; do
    local left=$((END - $(date +%s) - VERIFY_S - 10))
    [ $left -lt 30 ] && { echo "$spec: no time left" >> "$L/summary.txt"; continue; }
    R=$L/${spec//:/-} JOURNALS=$J SWEEP_S=$left VERIFY_S=$VERIFY_S \
      bash benchmarks/gpu_tables.sh "$spec" > "$L/${spec//:/-}.log" 2>&1
    echo "gpu$gpu $spec: $(grep -h 'sweep wall\|verify rc' "$L/${spec//:/-}/summary.txt" | tr '\n' ' ')" \
      >> "$L/summary.txt"
  done
}

if [ -n "${ONLY_ON:-}" ] && ! grep -q "$ONLY_ON" "$L/gpus.txt"; then
  echo "not a $ONLY_ON: tuning lanes skipped" | tee -a "$L/summary.txt"
  for g in 0 1 2 3 4 5 6 7; do unset "LANE$g"; done
fi
for g in 0 1 2 3 4 5 6 7; do
  v=LANE$g
  [ -n "${!v:-}" ] || { [ $g = 0 ] && [ -n "${CHECKS:-}" ]; } || continue
  lane $g ${!v:-} &
done
wait
cat "$L"/checks/summary.txt "$L/summary.txt" 2>/dev/null
tail -n 8 "$L"/checks/fp8_accum_qwen3.txt 2>/dev/null
cd "$OUT" && tar czf lanes.tgz lanes && rm -rf lanes
