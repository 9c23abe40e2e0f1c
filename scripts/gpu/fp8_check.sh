#!/usr/bin/env bash
# FP8 weights (issue 23) in one call on the GPU machine: the FP8 GPU tests (quality gate on a small trained
# model, CUDA graphs, fp8 KV cache, sampling, TP when 2 GPUs), then the 13B-shape bench on a reduced W1 as
# float16, float16 weights + fp8 KV cache, and fp8 weights + fp8 KV cache, one process each, then a table.
# Logs go to $OUT; about 9 minutes at most (TESTS_S + 3 x BENCH_S). Usage there:
#   [REQUESTS=256] [LAYERS=40] [VARIANTS="f16 kv8 w8kv8 w8"] [TESTS_S=180] [BENCH_S=120] bash scripts/gpu/fp8_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REQUESTS=${REQUESTS:-256}
LAYERS=${LAYERS:-40}
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TESTS_S:-180} python3 -m pytest -q -s tests/gpu/test_fp8_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/fp8_tests.log"
tests_rc=$?
declare -A FLAGS=([f16]="" [kv8]="--kv-cache-dtype fp8" [w8]="--quantization fp8"
                  [w8kv8]="--quantization fp8 --kv-cache-dtype fp8")
for v in ${VARIANTS:-f16 kv8 w8kv8}; do
  timeout ${BENCH_S:-120} python3 -m ziya_batch.tools.bench --layers "$LAYERS" --requests "$REQUESTS" \
      --only engine,roofline ${FLAGS[$v]} 2>&1 | tee "$OUT/bench_$v.log"
done
echo
printf "%-7s %-40s %12s %12s %14s %16s\n" variant flags "output tok/s" "roofline" "decode step ms" "weights ms/floor"
for v in ${VARIANTS:-f16 kv8 w8kv8}; do
  log="$OUT/bench_$v.log"
  tok=$(grep -m1 '^\[bench\] engine:' "$log" | sed -E 's/^\[bench\] engine: ([0-9,.]+) output.*/\1/')
  roof=$(grep -m1 '^\[bench\] roofline:' "$log" | sed -E 's/^\[bench\] roofline: ([0-9,.]+) output.*/\1/')
  step=$(grep -m1 '^\[bench\] decode step:' "$log" | sed -E 's/^\[bench\] decode step: ([0-9.]+) ms.*/\1/')
  # the step profile: "... 1-token contexts (...) W ms against a weight-byte floor of F ms" -> "W/F"
  wonly=$(grep -m1 'weight-byte floor' "$log" | sed -E 's/.*1-token contexts \([^)]*\) ([0-9.]+) ms against a weight-byte floor of ([0-9.]+) ms.*/\1\/\2/')
  printf "%-7s %-40s %12s %12s %14s %16s\n" "$v" "${FLAGS[$v]:-(float16)}" "${tok:-?}" "${roof:-?}" "${step:-?}" "${wonly:-?}"
done | tee "$OUT/fp8_table.txt"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|fp8 weights" "$OUT/fp8_tests.log" | tail -5
exit $tests_rc
