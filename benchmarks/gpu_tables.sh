#!/usr/bin/env bash
# Tables to ship, tuned on the GPU at hand: for each MODEL:TP[:QUANT] argument a full-space
# halving sweep (--keep 0.05, vLLM's 18 batch sizes; within 2% of exhaustive on the problems of
# results/tuning-curve/), its table and provenance exported under $R/configs, then `verify`
# of those tables. A sweep cut by the time limit (SWEEP_S, default 540 s) resumes from its
# journal when the same command is run again with JOURNALS pointing at the returned journals.
# Usage: benchmarks/gpu_tables.sh Qwen3-30B-A3B:2:fp8_w8a8 Mixtral-8x7B:2   (writes into $OUT)
# SKEW=1 also benches uniform vs zipf routing for each argument (tuned table vs default);
# GPUS=all (or 0,1,...) spreads each sweep over those GPUs (default: the current one).
# R=dir writes there instead of $OUT/r and leaves it unpacked (lanes of benchmarks/gpu_lanes.sh);
# VERIFY_S bounds the final verify (default 200 s). With JOURNALS set, a finished sweep's tables are
# also copied to $JOURNALS/../configs and $JOURNALS/NAME.done is touched (compare lanes wait on it).
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=${R:-$OUT/r}
J=${JOURNALS:-$R/journals}
mkdir -p $R/configs $R/bench $R/journals $J
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $R/summary.txt
for spec in "$@"; do
  IFS=: read -r model tp quant <<< "$spec"
  native=bf16; [[ $model == *-FP8 ]] && native=fp8block  # the -FP8 presets: 128x128 block scales
  name=$model-tp$tp-${quant:-$native}
  q=(); [ -n "${quant:-}" ] && q=(--quant "$quant")
  /usr/bin/time -f "$name sweep wall=%e s" timeout "${SWEEP_S:-540}" python3 -m moetune.cli sweep \
    --model "$model" --tp "$tp" "${q[@]}" --space full --strategy halving --keep 0.05 --json \
    ${GPUS:+--gpus "$GPUS"} \
    --journal "$J/$name.jsonl" --out $R/configs > $R/$name.json 2>> $R/$name.stderr.txt
  rc=$?
  tail -1 $R/$name.stderr.txt | tee -a $R/summary.txt
  echo "$name sweep rc=$rc" >> $R/summary.txt
  if [ $rc = 0 ] && [ "$J" != $R/journals ]; then  # lanes: publish the table for compare lanes
    mkdir -p "$J/../configs" && cp $R/configs/*.json "$J/../configs/" && touch "$J/$name.done"
  fi
  if [ "${SKEW:-0}" = 1 ]; then
    for skew in uniform zipf; do
      MOETUNE_CONFIG_DIR=$R/configs timeout 240 python3 -m moetune.cli bench --model "$model" \
        --tp "$tp" "${q[@]}" --skew $skew --batch-sizes 1,8,32,128,512,2048,4096 \
        --out $R/bench > $R/bench/$name-$skew.txt 2>&1
      echo "$name bench $skew rc=$?" | tee -a $R/summary.txt
    done
  fi
done
[ "$J" = $R/journals ] || for s in "$@"; do IFS=: read -r m t q <<< "$s"; n=bf16; [[ $m == *-FP8 ]] && n=fp8block; cp "$J/$m-tp$t-${q:-$n}.jsonl" $R/journals/ 2>/dev/null; done
timeout "${VERIFY_S:-200}" python3 -m moetune.cli verify $R/configs > $R/verify.txt 2>&1
echo "verify rc=$?" | tee -a $R/summary.txt; tail -5 $R/verify.txt
cat $R/bench/*.txt 2>/dev/null | tail -60
[ "$R" = "$OUT/r" ] && cd $OUT && tar czf r.tgz r && rm -rf r
