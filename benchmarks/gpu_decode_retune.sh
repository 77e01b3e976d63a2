#!/usr/bin/env bash
# Re-tune the M=1 entry of shipped tables on the GPU at hand, one device call (< 600 s).
# The shipped M=1 entries predate the direct slots of moetune 0.2.10 and PDL (0.2.11), and at
# M=1 32-column tiles beat the shipped 64 by 0.3-1.3 µs a GEMM (results/kernels/NOTES.md §22).
# For each MODEL:TP[:QUANT] argument: an exhaustive sweep at batch size 1 (BS=2,4,8,16: those)
# over the decode tiles
# (BLOCK_SIZE_M 16; N 32, 64, 128; K 64, 128, 256; GROUP_SIZE_M 1, 16, 32; 4 or 8 warps;
# 3-5 stages), with the shipped entry among the finalists (--incumbent auto), so a new entry is
# one that beat the shipped one in the same run's longer timing. SWEEP_S bounds each sweep
# (default 110 s). TILES=full sweeps the whole space instead, by halving within BUDGET seconds
# (default 230; SWEEP_S must exceed it), for entries above the decode sizes (BS=24,...,4096;
# benchmarks/gpu_retune_confirm.sh). Keep the returned journals under results/, then confirm the
# changed entries interleaved (J=that folder bash benchmarks/gpu_confirm_retune.sh, the next
# device call) and merge the confirmed ones here (benchmarks/merge_confirmed.py).
# Usage: bash benchmarks/gpu_decode_retune.sh Qwen3-30B-A3B:2:fp8_w8a8 gpt-oss-120b:1
#        (journals, sweep output and a summary in $OUT/retune.tgz)
set -u -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=$OUT/retune
mkdir -p $R/configs
if [ "${TILES:-decode}" = full ]; then  # the whole space, halving within BUDGET seconds a sweep
  tiles=(--strategy halving --budget "${BUDGET:-230}")
else
  tiles=(--strategy exhaustive --restrict BLOCK_SIZE_M=16 --restrict BLOCK_SIZE_N=32,64,128
    --restrict BLOCK_SIZE_K=64,128,256 --restrict GROUP_SIZE_M=1,16,32 --restrict num_stages=3,4,5)
fi
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $R/summary.txt
for spec in "$@"; do
  IFS=: read -r model tp quant <<< "$spec"
  native=bf16; [[ $model == *-FP8 ]] && native=fp8block  # the -FP8 presets: 128x128 block scales
  bs=${BS:-1}; name=$model-tp$tp-${quant:-$native}-m${bs//,/-}
  q=(); [ -n "${quant:-}" ] && q=(--quant "$quant")
  timeout "${SWEEP_S:-110}" python3 -m moetune.cli sweep --model "$model" --tp "$tp" "${q[@]}" \
    --batch-sizes "$bs" --space full --incumbent auto "${tiles[@]}" \
    --json --journal $R/$name.jsonl --out $R/configs/$name \
    > $R/$name.json 2> $R/$name.stderr.txt
  echo "$name sweep rc=$? $(tail -1 $R/$name.stderr.txt)" | tee -a $R/summary.txt
  python3 benchmarks/retune_summary.py $R/$name.jsonl --tables configs | tee -a $R/summary.txt
done
gzip -f $R/*.jsonl
(cd $OUT && tar czf retune.tgz retune && rm -rf retune)
