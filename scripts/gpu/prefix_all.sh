#!/usr/bin/env bash
# Prefix caching on the GPU machine: its GPU tests, a 4-layer smoke run of W2, then each workload of
# WORKLOADS with caching on and off in one process (engine rows only). Logs go to $OUT.
# Usage there: ZIYA_BATCH_COMMIT=<sha> [WORKLOADS="W2 W2g W1"] [SMOKE=0] bash scripts/gpu/prefix_all.sh
# Targets (one H100): W2 on >= 3x off; W1 on within 2% of off. The three full runs take ~10 minutes in all:
# give each its own call (WORKLOADS=W2, then W2g, then W1) where one call is limited to 10 minutes.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q tests/gpu/test_prefix_cache_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
[ "${SMOKE:-1}" = 0 ] || timeout 90 python3 -m ziya_batch.tools.bench --layers 4 --requests 64 --workload W2 \
    --prefix-caching both 2>&1 | tee "$OUT/smoke.log"
for w in ${WORKLOADS:-W2 W2g W1}; do
    timeout ${FULL_S:-540} python3 -m ziya_batch.tools.bench --workload "$w" --prefix-caching both 2>&1 \
        | tee "$OUT/bench_$w.log"
done
