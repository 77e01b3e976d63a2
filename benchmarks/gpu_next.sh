#!/usr/bin/env bash
# First GPU checks of the changes made without a GPU (one GPU, one device call, < 600 s):
#   1. GPU tests of the shared graph memory pool (tests/test_timing.py), the routing metadata
#      (both paths, tests/test_align.py), the fused activation + fp8 quantization and NaN kept
#      through the fp8 quantization (tests/test_activation.py, tests/test_quant_kernel.py), the op;
#   2. benchmarks/worker_contention.py (1 vs 4 processes when the host has 4 GPUs; the sweep's
#      evaluate now captures into one pool per process: "shared", the old way "fresh");
#   3. launch_overhead.py --static --align-step --fuse-step --quick: the routing metadata the
#      other way than the op's default (align_kernel.ONE_PROGRAM_DEFAULT) and the activation +
#      static fp8 quantization as two steps and as one, each checked against the float64
#      reference, with the floor.
# Usage: benchmarks/gpu_next.sh   (writes into $OUT)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $OUT/r/summary.txt
timeout 240 python3 -m pytest -q tests/test_timing.py tests/test_align.py tests/test_activation.py \
  tests/test_quant_kernel.py tests/test_op.py \
  > $OUT/r/pytest-gpu.log 2>&1; echo "pytest rc=$?" | tee -a $OUT/r/summary.txt
tail -3 $OUT/r/pytest-gpu.log | tee -a $OUT/r/summary.txt
G=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [ "$G" -ge 4 ]; then
  timeout 150 python3 benchmarks/worker_contention.py --procs 1,4 --variants fresh,shared,fresh,shared \
    --json $OUT/r/worker-contention.json 2>&1 | grep -v Warn | tee -a $OUT/r/summary.txt
fi
timeout 240 python3 benchmarks/launch_overhead.py $OUT/r/launch_overhead.json --quick --static \
  --align-step --fuse-step > $OUT/r/launch_overhead.log 2>&1; echo "launch_overhead rc=$?" \
  | tee -a $OUT/r/summary.txt
cat $OUT/r/launch_overhead.log | tail -30
cd $OUT && tar czf r.tgz r && rm -rf r
