#!/usr/bin/env bash
# One device call on a host of several GPUs, one lane per GPU, all lanes done within BUDGET_S
# (default 540 s). Lane 0 first runs the steps named in CHECKS, in order:
#   pytest  the GPU tests in PYTEST_FILES (default: checker, op, fp8 quantization, timing, procs);
#   fp8     benchmarks/fp8_accum.py with FP8_ARGS (default: Qwen3 TP2 at M=2048,4096, 5 draws);
#   verify  `moetune verify` of each path in VERIFY_TABLES;
#   faults  a GPU sweep of 16 candidates, 8 of them given one injected fault each (every kind);
#   report  benchmarks/gpu_report.sh for REPORT_SPECS (e.g. "Mixtral-8x7B:2").
# Then every lane tunes its specs (LANE0, LANE1, ...) one after the other with
# benchmarks/gpu_tables.sh (halving, full space), each sweep cut at the lane's remaining time, and
# verifies each table it finishes. Journals live in results/tmp/journals (ignored by git), so the
# same command run again on the still-warm machine resumes every cut sweep; copies come back in
# each spec's folder. With ONLY_ON="H200", a host of other GPUs runs ALT_LANE0, ALT_LANE1, ...
# and ALT_CHECKS instead (tables are per device name). A lane spec "compare:MODEL:TP[:QUANT]" runs
# `moetune bench` (static scales for a quant) with the tables of COMPARE_OLD under the environment
# COMPARE_OLD_ENV (e.g. MOETUNE_FP8_ACCUM=tile), then with COMPARE_NEW (default: the tables this
# host's lanes exported, results/tmp/configs, else configs/), on that lane's GPU, each with its
# own default-config and floor rows. When a lane of this host tunes that problem, the compare
# waits (polling) for its sweep to finish; it is skipped when under COMPARE_MIN_S (default 300) s
# are left.
# Usage: CHECKS="pytest fp8" LANE1="Mixtral-8x7B:2" ... bash benchmarks/gpu_lanes.sh
#        (everything in $OUT/lanes.tgz; REPORT.md beside it when a report ran)
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
  local steps=${alt}CHECKS
  for step in ${!steps:-}; do
    case $step in
      pytest)
        timeout 240 python3 -m pytest -q -p no:cacheprovider ${PYTEST_FILES:-tests/test_requant.py \
          tests/test_check.py tests/test_quant_kernel.py tests/test_timing.py tests/test_procs.py \
          tests/test_op.py} > "$c/pytest-gpu.log" 2>&1
        echo "pytest rc=$? $(tail -1 "$c/pytest-gpu.log")" | tee -a "$c/summary.txt" ;;
      fp8)
        # shellcheck disable=SC2086
        timeout 200 python3 benchmarks/fp8_accum.py "$c/fp8_accum.json" ${FP8_ARGS:---model \
          Qwen3-30B-A3B --tp 2 --configs M64-N128-K128-G16-w8-s4,M128-N128-K64-G16-w4-s4 \
          --batch-sizes 2048,4096 --seeds 5} > "$c/fp8_accum.txt" 2>&1
        echo "fp8_accum rc=$?" | tee -a "$c/summary.txt" ;;
      verify)
        for t in ${VERIFY_TABLES:-}; do
          timeout 150 python3 -m moetune.cli verify "$t" > "$c/verify-$(basename "$t").txt" 2>&1
          echo "verify $t rc=$?" | tee -a "$c/summary.txt"
        done ;;
      faults)
        # Every N=32 candidate of the restricted space gets one fault kind; the N=64 ones none.
        local faults
        faults=$(python3 -c 'import json; print(json.dumps({
          f"M16-N32-K64-G{1 if i < 4 else 16}-w4-s{2 + i % 4}": kind for i, kind in enumerate(
          ["compile", "resources", "nan", "wrong", "unwritten", "hang", "crash", "torn"])}))')
        rm -f "$J/faults-gpu.jsonl"
        MOETUNE_FAULTS=$faults timeout 240 python3 -m moetune.cli sweep --model Qwen3-30B-A3B \
          --tp 2 --space fast --batch-sizes 64 --restrict BLOCK_SIZE_M=16 \
          --restrict BLOCK_SIZE_N=32,64 --restrict BLOCK_SIZE_K=64 --restrict num_warps=4 \
          --timeout 30 --journal "$J/faults-gpu.jsonl" --out "$c/faults-tables" --json \
          > "$c/faults.json" 2> "$c/faults.stderr.txt"
        echo "faults rc=$? (faults: $faults)" | tee -a "$c/summary.txt"
        cp "$J/faults-gpu.jsonl" "$c/" 2>/dev/null
        python3 - "$J/faults-gpu.jsonl" <<'PY' | tee -a "$c/summary.txt"
import json, sys
try:
    lines = open(sys.argv[1]).readlines()[1:]
except OSError as e:
    sys.exit(f"no fault journal: {e}")
for line in lines:
    try:
        r = json.loads(line)
    except ValueError:
        print("(a torn last line)")
        continue
    if "candidate" in r:
        print(r["candidate"], r["status"], (r.get("reason") or "")[:70])
PY
        ;;
      report)
        SPECS=$REPORT_SPECS bash benchmarks/gpu_report.sh > "$c/report.log" 2>&1
        echo "report rc=$?" | tee -a "$c/summary.txt" ;;
    esac
  done
}

compare() {  # compare MODEL:TP[:QUANT]
  local model tp quant d
  IFS=: read -r model tp quant <<< "$1"
  d=$L/compare/$model-${quant:-bf16}
  mkdir -p "$d"
  local args=(--model "$model" --tp "$tp" --batch-sizes 1,8,32,128,512,2048,4096)
  [ -n "$quant" ] && args+=(--quant "$quant" --static-scales)
  local min=${COMPARE_MIN_S:-300}
  if [ $((END - $(date +%s))) -lt "$min" ]; then echo "compare $1: no time left" >> "$L/summary.txt"; return; fi
  local new=${COMPARE_NEW:-configs} name=$model-tp$tp-${quant:-bf16}
  if [ -z "${COMPARE_NEW:-}" ] && [ -f "$J/$name.jsonl" ]; then  # this host tunes it: wait for it
    while [ ! -f "$J/$name.done" ] && [ $((END - $(date +%s))) -ge "$min" ]; do sleep 10; done
    [ -f "$J/$name.done" ] || { echo "compare $1: its sweep has not finished" >> "$L/summary.txt"; return; }
    new=$J/../configs
  fi
  echo "compare $1: new tables from $new" >> "$L/summary.txt"
  for which in old new; do
    local dir=$new envs=()
    [ $which = old ] && { dir=$COMPARE_OLD; envs=(${COMPARE_OLD_ENV:-}); }
    env "${envs[@]}" MOETUNE_CONFIG_DIR=$dir timeout 230 python3 -m moetune.cli bench "${args[@]}" \
      --out "$d/$which" > "$d/$which.txt" 2>&1
    echo "compare $1 $which rc=$?" >> "$L/summary.txt"
    python3 benchmarks/report_table.py "$d/$which"/*.json > "$d/$which.md" 2>&1
  done
}

lane() {  # lane GPU SPEC...
  local gpu=$1
  shift
  export CUDA_VISIBLE_DEVICES=$gpu
  [ "$gpu" = 0 ] && checks
  for spec in "$@"; do
    [ "${spec%%:*}" = compare ] && { compare "${spec#compare:}"; continue; }
    local left=$((END - $(date +%s) - VERIFY_S - 10))
    [ $left -lt 30 ] && { echo "$spec: no time left" >> "$L/summary.txt"; continue; }
    R=$L/${spec//:/-} JOURNALS=$J SWEEP_S=$left VERIFY_S=$VERIFY_S \
      bash benchmarks/gpu_tables.sh "$spec" > "$L/${spec//:/-}.log" 2>&1
    echo "gpu$gpu $spec: $(grep -h 'sweep wall\|verify rc' "$L/${spec//:/-}/summary.txt" | tr '\n' ' ')" \
      >> "$L/summary.txt"
  done
}

alt=
if [ -n "${ONLY_ON:-}" ] && ! grep -q "$ONLY_ON" "$L/gpus.txt"; then
  echo "not a $ONLY_ON: the ALT_LANE specs run" | tee -a "$L/summary.txt"
  alt=ALT_
fi
for g in 0 1 2 3 4 5 6 7; do
  v=${alt}LANE$g
  [ -n "${!v:-}" ] || [ $g = 0 ] || continue
  lane $g ${!v:-} &
done
wait
cat "$L"/checks/summary.txt "$L/summary.txt" 2>/dev/null
tail -n 12 "$L"/checks/fp8_accum.txt 2>/dev/null
grep -h "^| [A-Za-z].*TP" "$L"/compare/*/*.md 2>/dev/null
cd "$OUT" && tar czf lanes.tgz lanes && rm -rf lanes
