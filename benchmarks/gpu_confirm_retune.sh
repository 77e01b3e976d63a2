#!/usr/bin/env bash
# Confirm a decode re-tune (benchmarks/gpu_decode_retune.sh) before its entries are merged:
# every point whose winner differs from the table in configs/ (benchmarks/retune_points.py over
# the journals in J) timed interleaved against it by benchmarks/close_configs.py (shipped entry
# first, timed twice: its two copies give the noise floor). Then the confirmed entries are
# merged into a copy of configs/ (benchmarks/merge_confirmed.py) and, if time is left, the 42
# points of issue 5 timed with those tables (gpu_fused.sh, VARIANTS auto and auto-pdl-early,
# MOETUNE_CONFIG_DIR). One device call (< 600 s); everything in $OUT/confirm.tgz, a summary last.
# Merge here afterwards with the returned JSON files:
#   python benchmarks/merge_confirmed.py CONFIRM_DIR $J configs
# Usage: J=results/tables/h100-0.2.11-decode-retune bash benchmarks/gpu_confirm_retune.sh
#        (ROUNDS, default 7; CONFIRM_S caps each table's timing, default 100 s; AFTER=report
#        times SPECS/QUANTS with `moetune bench` (gpu_report.sh), merged tables then shipped,
#        instead of the 42 points; AFTER=none skips that). The H100 run of 0.2.12 timed the 29
#        points this gives against the tables of moetune 0.2.11.
set -u -o pipefail
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
J=${J:-results/tables/h100-0.2.11-decode-retune}
R=$OUT/confirm
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $R/summary.txt
python3 benchmarks/retune_points.py "$J" > $R/points.txt || exit 1
while read -r name args; do
  # shellcheck disable=SC2086  # args: the --model/--point words, split on purpose
  timeout "${CONFIRM_S:-100}" python3 benchmarks/close_configs.py $R/$name.json \
    --rounds "${ROUNDS:-7}" $args > $R/$name.txt 2>&1
  echo "$name rc=$?" | tee -a $R/summary.txt
done < $R/points.txt
cp -r configs $R/merged
python3 benchmarks/merge_confirmed.py $R "$J" $R/merged > $R/merge.txt 2>&1
echo "merge rc=$? after ${SECONDS} s" | tee -a $R/summary.txt
if [ "${AFTER:-fused}" = report ]; then  # moetune bench of SPECS/QUANTS, merged and shipped tables
  for t in merged shipped; do
    dir=$R/merged; [ $t = shipped ] && dir=configs
    MOETUNE_CONFIG_DIR=$dir OUT=$R/report-$t bash benchmarks/gpu_report.sh > $R/report-$t.txt 2>&1
    echo "report $t rc=$? at ${SECONDS} s" | tee -a $R/summary.txt
  done
elif [ "${AFTER:-fused}" = fused ] && [ $SECONDS -lt 380 ]; then
  MOETUNE_CONFIG_DIR=$R/merged PYTEST=0 VARIANTS=auto,auto-pdl-early BREAKDOWN_S=$((560 - SECONDS)) \
    OUT=$R/after bash benchmarks/gpu_fused.sh > $R/after.txt 2>&1
  echo "after rc=$?" | tee -a $R/summary.txt
fi
(cd $OUT && tar czf confirm.tgz confirm)
cat $R/merge.txt
grep "geomean time/floor" $R/after.txt 2>/dev/null | tail -14
for t in merged shipped; do
  [ -f $R/report-$t/REPORT.md ] && echo "$t:" && grep '^|' $R/report-$t/REPORT.md | tail -n 8
done
rm -rf $R
