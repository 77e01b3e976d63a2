#!/usr/bin/env bash
# Separate up/down tuning on the GPU at hand, one device call (< 600 s): a `--gemms split`
# halving sweep of SPEC (MODEL:TP[:QUANT], default Qwen3-30B-A3B:2:fp8_w8a8) on the full space
# narrowed by RESTRICT (default: the tiles the shipped fp8 tables choose from: BLOCK_SIZE_K
# 128/256, 3-5 stages, GROUP_SIZE_M 1/16), `verify` of the two tables it exports, then
# `moetune bench` of the shipped (joint) table and of the split pair, in the order joint, split,
# joint (static scales for a quant; BENCH="split joint1" for fewer), at issue 5's seven batch
# sizes. BATCH_SIZES narrows the sweep's batch sizes (default: vLLM's 18). RESUME_FROM resumes
# a journal (say, one whose pair choices were taken out, to decide them again).
# Usage: bash benchmarks/gpu_split.sh   (everything in $OUT/split.tgz; the comparison printed last)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
R=$OUT/split
mkdir -p "$R/configs" "$R/bench"
IFS=: read -r model tp quant <<< "${SPEC:-Qwen3-30B-A3B:2:fp8_w8a8}"
q=(); s=(); [ -n "${quant:-}" ] && q=(--quant "$quant") && s=(--static-scales)
restrict=()
for r in ${RESTRICT:-BLOCK_SIZE_K=128,256 num_stages=3,4,5 GROUP_SIZE_M=1,16}; do
  restrict+=(--restrict "$r")
done
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$R/summary.txt"
# RESUME_FROM: a journal (.jsonl or .jsonl.gz) the sweep resumes instead of starting afresh
if [ -n "${RESUME_FROM:-}" ] && [ "$RESUME_FROM" != "$R/split.jsonl" ]; then
  case "$RESUME_FROM" in *.gz) gunzip -c "$RESUME_FROM" ;; *) cat "$RESUME_FROM" ;; esac > "$R/split.jsonl"
fi
/usr/bin/time -f "sweep wall=%e s" timeout "${SWEEP_S:-330}" python3 -m moetune.cli sweep \
  --model "$model" --tp "$tp" "${q[@]}" --space full "${restrict[@]}" --strategy halving \
  --keep 0.05 --gemms split ${BATCH_SIZES:+--batch-sizes "$BATCH_SIZES"} \
  --journal "$R/split.jsonl" --out "$R/configs" --json \
  > "$R/sweep.json" 2> "$R/sweep.stderr.txt"
rc=$?
echo "sweep rc=$rc $(tail -1 "$R/sweep.stderr.txt")" | tee -a "$R/summary.txt"
if [ $rc != 0 ] && [ $rc != 124 ]; then  # refused (a journal of another GPU, ...): say why, stop
  tail -5 "$R/sweep.stderr.txt"; (cd "$OUT" && tar czf split.tgz split && rm -rf split); exit 1
fi
grep "pairs:" "$R/sweep.stderr.txt" | tee -a "$R/summary.txt"
ls "$R/configs" | tee -a "$R/summary.txt"
timeout 90 python3 -m moetune.cli verify "$R/configs" > "$R/verify.txt" 2>&1
echo "verify rc=$? $(tail -1 "$R/verify.txt")" | tee -a "$R/summary.txt"
for run in ${BENCH:-joint1 split joint2}; do
  dir=configs; [ $run = split ] && dir=$R/configs
  MOETUNE_CONFIG_DIR=$dir timeout 100 python3 -m moetune.cli bench --model "$model" --tp "$tp" \
    "${q[@]}" "${s[@]}" --batch-sizes 1,8,32,128,512,2048,4096 --out "$R/bench/$run" \
    > "$R/bench/$run.txt" 2>&1
  echo "bench $run rc=$?" | tee -a "$R/summary.txt"
done
(cd "$OUT" && tar czf split.tgz split && rm -rf split)
python3 - "$OUT/split.tgz" <<'PY'
import json, sys, tarfile
from statistics import geometric_mean as gm
t = tarfile.open(sys.argv[1])
runs = {}
for m in t.getmembers():
    parts = m.name.split("/")
    if len(parts) == 4 and parts[1] == "bench" and m.name.endswith(".json"):
        runs[parts[2]] = {r["M"]: r for r in json.load(t.extractfile(m))["rows"]}
if "split" not in runs:
    sys.exit(f"no split bench ({sorted(runs)})")
for M, r in runs["split"].items():
    joint = [runs[j][M]["tuned"]["us"] for j in ("joint1", "joint2") if j in runs]
    print(f"M={M:<5} joint {' / '.join(f'{x:.1f}' for x in joint)} µs  split "
          f"{r['tuned']['us']:.1f} µs  floor {r['floor']['us']:.1f}  down {r['tuned']['config_down']}")
for name, rows in runs.items():
    print(f"{name}: geomean tuned/floor {gm([r['tuned_over_floor'] for r in rows.values()]):.3f}")
PY
