#!/usr/bin/env bash
# Full-space scaling on a multi-GPU host (issue 4), and the exhaustive journals the tuning-time
# curve (benchmarks/tuning_curve.py) is measured against.
#   stage "scaling": Qwen3-30B-A3B TP2 bf16, full space (1,304 candidates), 4 batch sizes,
#                    whole command on GPU 0 alone, then on all GPUs, each with an empty Triton cache.
#   stage "exhaustive": the all-GPU journal resumed to vLLM's 18 batch sizes, then Mixtral-8x7B
#                    TP2 bf16 full space at 18 batch sizes (resumable if cut by the time limit).
# Usage: benchmarks/gpu_scaling_full.sh scaling|exhaustive   (writes into $OUT)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=results/full-space
mkdir -p $R
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee -a $OUT/summary.txt
Q="sweep --model Qwen3-30B-A3B --tp 2 --space full --json"
if [ "$1" = scaling ]; then
  for g in 0 all; do
    rm -rf /tmp/triton-cache-$g; export TRITON_CACHE_DIR=/tmp/triton-cache-$g
    /usr/bin/time -f "qwen full 4bs gpus=$g wall=%e s" python3 -m moetune.cli $Q --gpus $g \
      --batch-sizes 1,64,512,4096 --journal $R/qwen3-scaling-gpus-$g.jsonl --out /tmp/t-$g \
      > $R/qwen3-scaling-gpus-$g.json 2> $R/qwen3-scaling-gpus-$g.stderr.txt
    tail -1 $R/qwen3-scaling-gpus-$g.stderr.txt | tee -a $OUT/summary.txt
  done
else
  export TRITON_CACHE_DIR=/tmp/triton-cache-all
  cp $R/qwen3-scaling-gpus-all.jsonl $R/qwen3-exhaustive.jsonl
  /usr/bin/time -f "qwen full 18bs resumed gpus=all wall=%e s" python3 -m moetune.cli $Q \
    --gpus all --journal $R/qwen3-exhaustive.jsonl --out /tmp/tq > $R/qwen3-exhaustive.json \
    2> $R/qwen3-exhaustive.stderr.txt
  tail -1 $R/qwen3-exhaustive.stderr.txt | tee -a $OUT/summary.txt
  /usr/bin/time -f "mixtral full 18bs gpus=all wall=%e s" timeout ${MIXTRAL_S:-330} \
    python3 -m moetune.cli sweep --model Mixtral-8x7B --tp 2 --space full --json --gpus all \
    --journal $R/mixtral-exhaustive.jsonl --out /tmp/tm > $R/mixtral-exhaustive.json \
    2> $R/mixtral-exhaustive.stderr.txt
  tail -1 $R/mixtral-exhaustive.stderr.txt | tee -a $OUT/summary.txt
fi
python3 - "$R" <<'PY' | tee -a $OUT/summary.txt
import json, sys, glob
for p in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    lines = open(p).read().splitlines()[1:]
    recs = [json.loads(l) for l in lines if l.strip()]
    st = {}
    for r in recs:
        if "status" in r:
            st[r["status"]] = st.get(r["status"], 0) + 1
    ev = sum(r.get("eval_s", 0) for r in recs)
    print(p, st, f"sum eval_s={ev:.0f}", "winners", sum(r.get("kind") == "winner" for r in recs))
PY
tar czf $OUT/full-space.tgz $R
