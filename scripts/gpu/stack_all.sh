#!/usr/bin/env bash
# One call on a two-GPU machine (ray, redis and the spec's packages installed under /tmp/site, redis-server under
# /tmp/redis): the tensor-parallel GPU tests, then W1 through the stack for one replica of TP=1 and two of TP=1
# (random 13B-shape weights; add 2x1 to CONFIGS for one replica of TP=2). Logs and tables go to $OUT.
# Usage there: ZIYA_BATCH_COMMIT=<sha> [CONFIGS=1x1,1x2] [STACK_ARGS=...] bash scripts/gpu/stack_all.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:. OUT=${OUT:-/tmp/out} RAY_AUTH_MODE=disabled \
    PATH=/tmp/redis/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-} \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tp_gpu.py 2>&1 | tee "$OUT/tp_tests.log" | tail -5
timeout ${STACK_S:-420} python3 scripts/gpu/bench_stack.py --work /tmp/stack --out "$OUT" --skip-parity \
    --configs "${CONFIGS:-1x1,1x2}" ${STACK_ARGS:-} > "$OUT/stack.log" 2>&1
echo "bench_stack rc $?"
cat "$OUT/stack.md" 2>/dev/null || tail -20 "$OUT/stack.log"
