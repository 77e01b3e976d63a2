#!/usr/bin/env bash
# Issue-5 GPU runs on one GPU, in two device calls (each under the 600 s per-command limit):
#   stage "kernels": GPU tests of the align/activation kernels and the op; the before/after
#                    benchmark of those kernels on the three reference problems (bf16, fp8);
#                    `moetune verify` of the shipped tables.
#   stage "halving": a real budgeted sweep (Qwen3-30B-A3B TP2 bf16, full space, 18 batch sizes,
#                    --strategy halving --keep 0.05) timed end to end, its winners looked up in
#                    the exhaustive journal (results/full-space/).
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $OUT/r/summary.txt
if [ "$1" = kernels ]; then
  timeout 200 python3 -m pytest -q tests/test_align.py tests/test_activation.py tests/test_quant_kernel.py tests/test_op.py \
    > $OUT/r/pytest-gpu.log 2>&1; echo "pytest rc=$?" | tee -a $OUT/r/summary.txt
  tail -3 $OUT/r/pytest-gpu.log | tee -a $OUT/r/summary.txt
  timeout 330 python3 benchmarks/launch_overhead.py $OUT/r/launch_overhead.json --quant-step \
    > $OUT/r/launch_overhead.log 2>&1; echo "launch_overhead rc=$?" | tee -a $OUT/r/summary.txt
  timeout 60 python3 -m moetune.cli verify configs/ > $OUT/r/verify.log 2>&1
  echo "verify rc=$?" | tee -a $OUT/r/summary.txt; tail -4 $OUT/r/verify.log
  cat $OUT/r/launch_overhead.log
else
  J=$OUT/r/qwen3-halving-0.05.jsonl
  /usr/bin/time -f "halving keep=0.05 wall=%e s" timeout 560 python3 -m moetune.cli sweep \
    --model Qwen3-30B-A3B --tp 2 --space full --strategy halving --keep 0.05 --json \
    --journal $J --out $OUT/r/tables > $OUT/r/halving.json 2> $OUT/r/halving.stderr.txt
  tail -1 $OUT/r/halving.stderr.txt | tee -a $OUT/r/summary.txt
  python3 benchmarks/tuning_curve.py results/full-space/qwen3-full-gpus-0.jsonl.gz --run $J \
    --json $OUT/r/halving-vs-exhaustive.json | tee -a $OUT/r/summary.txt
  gzip -9 $J
fi
cd $OUT && tar czf r.tgz r && rm -rf r
