#!/usr/bin/env bash
# Full-space scaling on a multi-GPU host (issue 4), and the exhaustive journals the tuning-time
# curve (benchmarks/tuning_curve.py) is measured against. Each stage starts from an empty Triton
# cache, so compiling is part of every wall time.
#   stage "all": Qwen3-30B-A3B TP2 bf16, full space (1,304 candidates), vLLM's 18 batch sizes, on
#                all GPUs; then (OLMOE=1) OLMoE-1B-7B bf16 the same way (second exhaustive journal).
#   stage "one": the same Qwen3 sweep on GPU 0 alone (cut at ONE_S=585 s by the device's
#                per-command limit if need be: re-run the stage to resume it and add the wall
#                times; benchmarks/gpu_scaling_session.sh runs it in the background instead).
# Usage: benchmarks/gpu_scaling_full.sh all|one   (writes into $OUT)
#        CW=24 ... sets --compile-workers (default: 16 + 4 per extra GPU, at most one per core);
#        R=results/<folder> picks where journals and logs go; SMOKE=0 skips the smoke test.
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=${R:-results/full-space-0.4}
mkdir -p $R
nvidia-smi --query-gpu=index,name --format=csv,noheader | head -1 | tee -a $OUT/summary.txt
nproc | sed 's/^/cpus: /' | tee -a $OUT/summary.txt
run() {  # name gpus timeout args...
  local name=$1 g=$2 limit=$3; shift 3
  /usr/bin/time -f "$name gpus=$g wall=%e s" timeout $limit python3 -m moetune.cli sweep \
    --space full --json --gpus $g --journal $R/$name.jsonl --out /tmp/t-$name "$@" \
    ${CW:+--compile-workers "$CW"} \
    > $R/$name.json 2>> $R/$name.stderr.txt
  grep -E "workers ready|compiled [0-9]+ candidates" $R/$name.stderr.txt | tail -2 \
    | tee -a $OUT/summary.txt
  tail -1 $R/$name.stderr.txt | tee -a $OUT/summary.txt
}
if [ "${SMOKE:-1}" = 1 ]; then
# Smoke test: a compile process's way ("target": CPU tensors, Triton told the GPU's target, no
# CUDA) must put the GEMMs in the cache without a CUDA context; a real launch in another process
# must then find them there (no new cache entry).
export TRITON_CACHE_DIR=/tmp/triton-smoke; rm -rf $TRITON_CACHE_DIR
cat > /tmp/smoke_common.py <<'PY'
import os
from moetune.problem import Problem
CONFIG = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4,
              num_stages=3)
PROBLEM = Problem(8, 384, 2048, 8, "bfloat16")
def gemm_entries():
    root = os.environ["TRITON_CACHE_DIR"]
    return sorted(d for d in os.listdir(root)
                  if any(f.startswith("fused_moe_kernel") for f in os.listdir(f"{root}/{d}")))
PY
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
CAP=$CAP python3 - <<'PY' 2>&1 | tail -3 | tee -a $OUT/summary.txt
import os, subprocess, sys, time
sys.path.insert(0, "/tmp")
import torch
from smoke_common import CONFIG, PROBLEM, gemm_entries
from moetune.inputs import random_moe_inputs
from moetune.launch import compile_only
from moetune.ops import fused_experts
from moetune.precompile import pin_target
t0 = time.time()
pin_target(int(os.environ["CAP"]))
args, kw = random_moe_inputs(PROBLEM, 16, "cpu", seed=0)
with compile_only():
    fused_experts(*args, config=CONFIG, **kw)
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.split()
print(f"compile without CUDA: GEMM cache entries {len(gemm_entries())} in {time.time()-t0:.1f} s"
      f" | torch.cuda initialised: {torch.cuda.is_initialized()}"
      f" | CUDA context: {str(os.getpid()) in apps}")
assert len(gemm_entries()) >= 1 and not torch.cuda.is_initialized()
PY
rc1=$?
python3 - <<'PY' 2>&1 | tail -3 | tee -a $OUT/summary.txt
import sys
sys.path.insert(0, "/tmp")
import torch
from smoke_common import CONFIG, PROBLEM, gemm_entries
from moetune.inputs import random_moe_inputs
from moetune.ops import fused_experts
before = gemm_entries()
args, kw = random_moe_inputs(PROBLEM, 16, "cuda", seed=0)
fused_experts(*args, config=CONFIG, **kw)
torch.cuda.synchronize()
print("real launch in another process: GEMM cache entries", len(before), "->",
      len(gemm_entries()), "(same = cache hit)")
assert gemm_entries() == before
PY
rc2=$?
# Helpers forked from the fork server (moetune.procs): a small sweep on every GPU must start its
# workers there, each on its own GPU, and pass its checks.
python3 -m moetune.cli sweep --model Qwen3-30B-A3B --tp 2 --space fast --batch-sizes 1,64 \
  --restrict BLOCK_SIZE_M=16,64 --restrict num_stages=3 --gpus all --json --fresh \
  --journal /tmp/forked.jsonl --out /tmp/forked > /tmp/forked.json 2> /tmp/forked.err
rc3=$?
grep -E "workers ready|compiled [0-9]+ candidates" /tmp/forked.err | tee -a $OUT/summary.txt
python3 - <<'PY2' | tee -a $OUT/summary.txt
import json
recs = [json.loads(l) for l in open("/tmp/forked.jsonl").read().splitlines()[1:] if l.strip()]
st = {}
for r in recs:
    if "status" in r:
        st[r["status"]] = st.get(r["status"], 0) + 1
print("forked mini sweep:", st, "GPUs used:", sorted({r.get("gpu") for r in recs if "gpu" in r}))
PY2
echo "smoke rc=$rc1,$rc2,$rc3 (the sweeps go on either way: compile processes fall back to" \
  "Triton asking the GPU, then to GPU inputs)" \
  | tee -a $OUT/summary.txt
fi
if [ "$1" = all ]; then
  rm -rf /tmp/triton-cache-all; export TRITON_CACHE_DIR=/tmp/triton-cache-all
  run qwen3-full-gpus-all all 400 --model Qwen3-30B-A3B --tp 2
  [ "${OLMOE:-0}" = 1 ] && run olmoe-full-gpus-all all ${OLMOE_S:-170} --model OLMoE-1B-7B
else
  [ -f $R/qwen3-full-gpus-0.jsonl ] || rm -rf /tmp/triton-cache-0
  export TRITON_CACHE_DIR=/tmp/triton-cache-0
  run qwen3-full-gpus-0 0 ${ONE_S:-585} --model Qwen3-30B-A3B --tp 2
fi
python3 - "$R" <<'PY' | tee -a $OUT/summary.txt
import json, sys, glob, statistics
for p in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    recs = [json.loads(l) for l in open(p).read().splitlines()[1:] if l.strip()]
    st = {}
    for r in recs:
        if "status" in r:
            st[r["status"]] = st.get(r["status"], 0) + 1
    ok = [r for r in recs if r.get("status") == "ok" and r.get("phase") != "final"]
    firsts, seen = [], set()
    for r in ok:
        if r["candidate"] not in seen:
            seen.add(r["candidate"]); firsts.append(r["eval_s"])
    ts = [r["t"] for r in recs if "t" in r]
    print(p, st, f"sum eval_s={sum(r.get('eval_s', 0) for r in recs):.0f}",
          f"span={max(ts) - min(ts):.0f}s" if ts else "",
          f"first-pair eval_s median={statistics.median(firsts):.3f}" if firsts else "",
          f"all median={statistics.median(r['eval_s'] for r in ok):.3f}" if ok else "",
          "winners", sum(r.get("kind") == "winner" for r in recs))
PY
tar czf $OUT/$(basename $R)-$1.tgz $R
