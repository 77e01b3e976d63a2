#!/usr/bin/env bash
# Issue 4's scaling pair on one multi-GPU host without cutting the 1-GPU run at the device's
# 10-minute command limit: "start" runs the all-GPU stage of gpu_scaling_full.sh, then starts the
# 1-GPU stage in the background (its own session, so it outlives this command if the machine
# stays warm: issue the next command within the device's idle release, ~30 s) and waits up to
# WAIT_S; "finish", the next command on the same warm machine, waits for it to end (or resumes
# it from its journal if it did not survive) and returns both runs.
# Usage: benchmarks/gpu_scaling_session.sh start|finish   (writes into $OUT)
set -u -o pipefail
export R=${R:-/tmp/fs05} SMOKE=${SMOKE:-0}
T0=$(date +%s)
wait_one() {  # seconds
  while [ ! -f /tmp/one.done ] && [ $(( $(date +%s) - T0 )) -lt "$1" ]; do sleep 2; done
}
if [ "$1" = start ]; then
  rm -rf /tmp/one-out /tmp/one.done; mkdir -p /tmp/one-out
  bash benchmarks/gpu_scaling_full.sh all
  (OUT=/tmp/one-out ONE_S=1200 setsid nohup bash -c \
    'bash benchmarks/gpu_scaling_full.sh one; touch /tmp/one.done' > /tmp/one.log 2>&1 \
    < /dev/null &)  # nothing of this command's output held open: it may end before the run
  wait_one "${WAIT_S:-560}"
else
  if [ ! -f /tmp/one.done ] && ! pgrep -f "gpus 0 --journal" > /dev/null; then
    echo "the background 1-GPU run did not survive: resuming it here" | tee -a $OUT/summary.txt
    OUT=/tmp/one-out bash benchmarks/gpu_scaling_full.sh one >> /tmp/one.log 2>&1
    touch /tmp/one.done
  fi
  wait_one "${WAIT_S:-560}"
  cp /tmp/one-out/* /tmp/one.log $OUT/ 2>/dev/null
  cat /tmp/one-out/summary.txt
fi
echo "stage $1 done after $(( $(date +%s) - T0 )) s; 1-GPU run finished: $([ -f /tmp/one.done ] && echo yes || echo no)" | tee -a $OUT/summary.txt
tail -3 $R/qwen3-full-gpus-0.stderr.txt 2>/dev/null
