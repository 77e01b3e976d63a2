#!/usr/bin/env bash
# Issue-4 GPU runs in one device call on a multi-GPU host:
#  1. scaling: the same sweep (Qwen3-30B-A3B TP2, bf16, fast space, 4 batch sizes) on 1 GPU and
#     on all GPUs, each with its own empty Triton cache so both pay the same compile;
#  2. kill -9 of a running sweep's process group, then resume from its journal;
#  3. fault injection on the GPU (compile, hang, crash, NaN, wrong values).
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name --format=csv,noheader
S="sweep --model Qwen3-30B-A3B --tp 2 --space fast --batch-sizes 16,256,2048 --json"
for g in 0 all; do
  export TRITON_CACHE_DIR=/tmp/triton-cache-$g
  /usr/bin/time -f "gpus=$g wall=%e s" python3 -m moetune.cli $S --gpus $g \
    --journal results/scaling-gpus-$g.jsonl --out /tmp/tables-$g > $OUT/scaling-$g.json 2> /tmp/err-$g
  tail -1 /tmp/err-$g | tee -a $OUT/summary.txt
done
unset TRITON_CACHE_DIR
J=results/killresume.jsonl
setsid python3 -m moetune.cli $S --batch-sizes 64,512 --journal $J --out /tmp/kr > /dev/null 2>&1 &
PID=$!; sleep 35; kill -9 -- -$PID; sleep 2
echo "killed: $(($(wc -l < $J) - 1)) records, last line bytes: $(tail -c 80 $J | wc -c)" | tee -a $OUT/summary.txt
python3 -m moetune.cli $S --batch-sizes 64,512 --journal $J --out /tmp/kr > $OUT/resume.json 2> /tmp/err-r
echo "resume rc=$? records=$(($(wc -l < $J) - 1))" | tee -a $OUT/summary.txt
MOETUNE_FAULTS='{"M16-N32-K64-G1-w4-s3":"crash","M16-N32-K64-G1-w4-s4":"hang","M16-N32-K64-G1-w4-s5":"nan","M16-N32-K64-G16-w4-s3":"compile","M16-N32-K64-G16-w4-s4":"wrong"}' \
  python3 -m moetune.cli sweep --model Qwen3-30B-A3B --tp 2 --space fast --batch-sizes 64 \
  --restrict BLOCK_SIZE_M=16 --restrict BLOCK_SIZE_N=32 --restrict BLOCK_SIZE_K=64 \
  --restrict num_warps=4 --timeout 30 --journal results/faults-gpu.jsonl --out /tmp/f --json \
  > $OUT/faults.json 2> /tmp/err-f
echo "faults rc=$?" | tee -a $OUT/summary.txt
python3 - <<'PY' | tee -a $OUT/summary.txt
import json
for l in open("results/faults-gpu.jsonl").readlines()[1:]:
    r = json.loads(l)
    if "candidate" in r:
        print(r["candidate"], r["status"], r.get("reason", "")[:70])
PY
tar czf $OUT/journals.tgz results/*.jsonl /tmp/err-*
